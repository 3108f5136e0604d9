"""Rich tables for the demo's results dict (see ``fedbip_hub.demo.scenario.Scenario.run``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

METHOD_NAMES = {
    "local": "local only",
    "fedit": "FedIT",
    "fedavg": "FedAvg-ΔW",
    "uniform": "uniform",
    "fedbip": "FedBip",
    "fedbip-l": "FedBip-L",
    "fedbip-m": "FedBip-M",
    "fedbip-l-paper": "FedBip-L paper",
    "oracle": "oracle",
}


def method_name(label: str) -> str:
    return METHOD_NAMES.get(label, label)


def _pct(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def accuracy_table(results: Mapping[str, Any]) -> Table:
    """Personalized accuracy per method: all clients, task-shift clients, each group."""
    methods = results["methods"]
    groups = list(next(iter(methods.values()))["accuracy_per_group"])
    majority = results.get("majority_task")
    table = Table(title="Personalized accuracy (%) on each client's own held-out test set",
                  title_justify="left")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("all", justify="right")
    table.add_column("shift", justify="right")
    for g in groups:
        table.add_column(f"{g}{'*' if g == majority else ''}", justify="right")
    table.add_column("Δlocal", justify="right")
    table.add_column("Δoracle", justify="right")
    local = methods.get("local", {}).get("accuracy")
    oracle = methods.get("oracle", {}).get("accuracy")
    best = max(m["accuracy"] for label, m in methods.items() if label != "oracle")
    for label, m in methods.items():
        style = "green" if m["accuracy"] == best else None
        table.add_row(
            method_name(label), _pct(m["accuracy"]), _pct(m.get("accuracy_task_shift")),
            *[_pct(m["accuracy_per_group"][g]) for g in groups],
            _pct(m["accuracy"] - local, signed=True) if local is not None else "–",
            _pct(m["accuracy"] - oracle, signed=True) if oracle is not None else "–",
            style=style)
    table.caption = ("shift: clients off the majority task (*); Δ: accuracy points; "
                     "oracle: uniform within the true task group")
    return table


def similarity_table(results: Mapping[str, Any], method: str = "fedbip-l") -> Table:
    """Does the cosine separate same-group from different-group client pairs?"""
    similarity = results["similarity"]
    per_method = similarity["task_vectors"]
    source = method if method in per_method else next(iter(per_method), None)
    table = Table(title="Cosine of same-task vs different-task client pairs",
                  title_justify="left")
    table.add_column("cosine of", no_wrap=True)
    for column in ("AUC", "same", "different", "gap"):
        table.add_column(column, justify="right")

    def row(name: str, s: Mapping[str, float]) -> None:
        table.add_row(name, f"{s['auc']:.3f}", f"{s['mean_same']:.4f}",
                      f"{s['mean_different']:.4f}",
                      f"{s['mean_same'] - s['mean_different']:.4f}")

    if source is not None:
        tv = per_method[source]
        row(f"task vectors, round {tv['round1'].get('round', 1)}", tv["round1"])
        table.add_row("task vectors, every round", f"{tv['auc_mean']:.3f}",
                      "", "", "")
        if tv.get("memory_auc_mean") is not None:
            table.add_row("similarity memory, every round",
                          f"{tv['memory_auc_mean']:.3f}", "", "", "")
    raw = similarity.get("raw_parameters_round1")
    if raw:
        row("raw parameters, round 1", raw)
    table.caption = ("AUC: P(a same-task pair is more similar than a different-task pair); "
                     "same/different: mean cosine; raw parameters: base + ΔW + head; "
                     "similarity memory: the cosines the weights use")
    return table


def rounds_table(results: Mapping[str, Any], method: str = "fedbip-l") -> Table:
    methods = results["methods"]
    source = method if method in methods else next(iter(methods))
    table = Table(title=f"Asynchronous rounds ({method_name(source)})", title_justify="left")
    for column in ("round", "fresh uploads", "stale uploads (versions)", "not fresh"):
        table.add_column(column)
    clients = [c["name"] for c in results["clients"]]
    for r in methods[source]["rounds"]:
        fresh = r["fresh"]
        stale = ", ".join(f"{c} ({a})" for c, a in r["staleness"].items()) or "–"
        missing = ", ".join(c for c in clients if c not in fresh) or "–"
        table.add_row(str(r["round"]), str(len(fresh)), stale, missing)
    return table


def render(results: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    base = results["base_model"]
    config = results["config"]
    groups: dict[str, list[str]] = {}
    for c in results["clients"]:
        groups.setdefault(c["task"], []).append(c["name"])
    spec = config["base"]
    console.print(
        f"[bold]fedbip demo[/]: {len(results['clients'])} clients in {len(groups)} task "
        f"groups, {config['rounds']} asynchronous rounds, one local-folder federation per "
        "method.")
    built = ("reused from cache" if base["reused"]
             else f"built in {base['pretrain_seconds']:.0f}s")
    pretrained = ", ".join(f"{k} {100 * v:.0f}%" for k, v in base["pretrain_accuracy"].items())
    console.print(
        f"Base model: Llama, {spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}, "
        f"pre-trained on the mixture of all tasks ({built}; multi-task accuracy {pretrained}).")
    n_train = config["n_train"]
    console.print(
        f"Each client: {n_train} training examples ({100 * config['label_noise']:.0f}% "
        f"labels flipped), {config['n_test']} test examples; LoRA r={config['lora_r']} on "
        f"{', '.join(config['target_modules'])} + head.")
    for task, names in groups.items():
        description = next(c["task_description"] for c in results["clients"]
                           if c["task"] == task)
        console.print(f"  [bold]{task}[/] ({description}): {', '.join(names)}",
                      highlight=False)
    console.print()
    console.print(accuracy_table(results))
    console.print()
    console.print(similarity_table(results))
    console.print()
    console.print(rounds_table(results))
    files = results.get("files", {})
    if files:
        console.print()
        for name, path in files.items():
            console.print(f"{name}: {path}")
    console.print(f"Total {results['seconds']:.0f}s.")
