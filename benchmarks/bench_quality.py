"""Quality benchmark (issue 4): personalized accuracy of FedBip against its baselines.

The demo's comparison (``fedbip demo``) at a larger scale, over several seeds, with
ablations. Every run goes through the real path on the local-folder backend:
``train_adapter`` → ``client.push`` → ``rounds.run_round`` → pull → train again, one
federation per method and seed, all methods on the same clients, data and schedule.

Scenario: 12 clients in 4 conflicting task groups (4/3/3/2 clients; the 4-client group is
the majority task, the other 8 clients are "task-shift" clients), 64 training examples
each with 10% of the labels flipped, 6 asynchronous rounds with 2 late clients in rounds
2 and 4 (their uploads land one round later, one version stale).

Reported, mean ± std over seeds:
* accuracy of every method (all clients, task-shift clients, each group);
* ablations: similarity granularity (model, layer, module) and weighting (the paper's
  row normalisation with and without clipping, softmax temperatures, top-k, z-scored
  peers with several self shares) and the similarity memory (γ = 1, 0.5, off);
* how well cosines separate same-task from different-task client pairs (AUC), for task
  vectors (every round) and for raw parameters (base + ΔW + head, round 1);
* the issue's targets, met or not.

The heatmap PNG that every round draws for the model cards is replaced by a stub (it is
half the run time and no part of the maths); pass --render-heatmaps to keep it.

Run from the repository root::

    .venv/bin/python benchmarks/bench_quality.py              # full, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_quality.py --quick      # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedbip_hub.demo import demo_config  # noqa: E402
from fedbip_hub.demo.base_model import BaseModelSpec  # noqa: E402
from fedbip_hub.demo.methods import FEDBIP_OPTIONS, Method, default_methods  # noqa: E402
from fedbip_hub.demo.metrics import mean_std  # noqa: E402
from fedbip_hub.demo.report import method_name  # noqa: E402
from fedbip_hub.demo.scenario import Scenario, ScenarioConfig, prepare_dir  # noqa: E402
from fedbip_hub.engine.strategies import Strategy  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"

# Targets of issue 4 (accuracy in points, over the seeds' mean).
TARGET_VS_FEDIT_SHIFT = 5.0
TARGET_VS_ORACLE = 2.0
TARGET_AUC = 0.95

# Methods whose uploads also get the cumulative task-vector AUC (upload − initial adapter).
DIAGNOSED = ("local", "fedbip-l")

console = Console(width=None if sys.stdout.isatty() else 120)


def full_config(seed: int) -> ScenarioConfig:
    return ScenarioConfig(
        groups=("low",) * 4 + ("even",) * 3 + ("marked",) * 3 + ("tagged",) * 2,
        n_train=64, n_test=200, label_noise=0.1, rounds=6,
        late={2: ("low-2", "even-2"), 4: ("marked-1", "tagged-2")},
        seed=seed, base=BaseModelSpec(seed=seed))


def quick_config(seed: int) -> ScenarioConfig:
    return demo_config(quick=True, seed=seed)


@dataclass(frozen=True)
class Variant:
    """An ablation row: the study it belongs to, its setting, and the strategy it runs."""

    study: str
    setting: str
    strategy: Strategy


def ablations(options: dict[str, Any]) -> list[Variant]:
    """Granularity (with the chosen weighting), weighting (per layer, FedBip-L) and the
    similarity memory's decay."""
    def s(method: str, **extra: Any) -> Strategy:
        return Strategy(method=method, **extra)

    chosen = dict(options)
    variants = [
        Variant("granularity", "model (FedBip)", s("fedbip", **chosen)),
        Variant("granularity", "layer (FedBip-L)", s("fedbip-l", **chosen)),
        Variant("granularity", "module (FedBip-M)", s("fedbip-m", **chosen)),
        Variant("weighting", "normalize, clip c<0", s("fedbip-l", rule="normalize")),
        Variant("weighting", "normalize, keep c<0 (paper-literal)",
                s("fedbip-l", rule="normalize", clip_negative=False)),
        Variant("weighting", "softmax T=0.1", s("fedbip-l", rule="softmax", temperature=0.1)),
        Variant("weighting", "softmax T=0.3", s("fedbip-l", rule="softmax", temperature=0.3)),
        Variant("weighting", "normalize, top-2 peers", s("fedbip-l", rule="normalize", top_k=2)),
    ]
    for share in (0.2, 0.3, 0.5, 0.7):
        variants.append(Variant("weighting", f"zscore, self share {share}",
                                s("fedbip-l", rule="zscore", self_share=share)))
    variants.append(Variant("weighting", "zscore, self share 0.3, keep c<0",
                            s("fedbip-l", rule="zscore", self_share=0.3,
                              clip_negative=False)))
    for decay, setting in ((1.0, "memory γ=1 (default)"), (0.5, "memory γ=0.5"),
                           (0.0, "this round only (the paper)")):
        variants.append(Variant("similarity memory", setting,
                                s("fedbip-l", **chosen, similarity_memory=decay)))
    return variants


def _key(strategy: Strategy) -> str:
    return json.dumps(strategy.model_dump(mode="json"), sort_keys=True)


def stub_heatmaps() -> None:
    """Model cards get a 1×1 PNG instead of the rendered heatmap (render time only)."""
    import io

    from PIL import Image

    import fedbip_hub.federation.modelcard as modelcard

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(buffer, format="PNG")
    tiny = buffer.getvalue()
    modelcard.heatmap_png = lambda _report, **_kw: tiny


def run_seed(seed: int, config: ScenarioConfig, methods: Sequence[Method],
             work: Path) -> dict[str, Any]:
    """Every method on one seed; returns per-method summaries and the similarity AUCs."""
    scenario = Scenario(config, work / f"seed-{seed}",
                        log=lambda line: console.print(f"  [dim]seed {seed}[/] {line}",
                                                       highlight=False))
    scenario.load_base(work / f"base-seed-{seed}")
    runs = prepare_dir(scenario.root)
    out: dict[str, Any] = {}
    for method in methods:
        began = time.perf_counter()
        result = scenario.run_method(runs, method)
        summary = result.to_json(scenario.groups, scenario.shifted)
        similarity = scenario.similarity_summary({method.label: summary})
        tv = similarity["task_vectors"].get(method.label)
        out[method.label] = {
            "accuracy": summary["accuracy"],
            "accuracy_task_shift": summary["accuracy_task_shift"],
            "accuracy_per_group": summary["accuracy_per_group"],
            "accuracy_per_client": summary["accuracy_per_client"],
            "task_vector_auc_round1": tv["round1"]["auc"] if tv else None,
            "task_vector_auc_per_round": tv["auc_per_round"] if tv else None,
            "task_vector_auc_mean": tv["auc_mean"] if tv else None,
            "task_vector_gap_round1": (tv["round1"]["mean_same"]
                                       - tv["round1"]["mean_different"]) if tv else None,
            "memory_auc_per_round": [r["memory_auc"] for r in summary["rounds"]
                                     if r.get("memory_auc") is not None] or None,
            "cumulative_auc_per_round": (scenario.cumulative_auc(result)
                                         if method.label in DIAGNOSED else None),
            "staleness": {str(r["round"]): r["staleness"] for r in summary["rounds"]
                          if r["staleness"]},
            "seconds": round(time.perf_counter() - began, 2),
        }
        console.print(f"  [dim]seed {seed}[/] {method.label}: "
                      f"{100 * summary['accuracy']:.1f}% "
                      f"({out[method.label]['seconds']:.0f}s)", highlight=False)
    raw = scenario.raw_similarity or {}
    shutil.rmtree(runs, ignore_errors=True)
    return {"methods": out, "raw_parameters_round1": {
        k: raw.get(k) for k in ("auc", "mean_same", "mean_different", "min", "max",
                                "gap_over_spread")},
        "groups": scenario.groups, "task_shift_clients": scenario.shifted,
        "base_pretrain_accuracy": scenario.base_info.pretrain_accuracy}


def aggregate(per_seed: Sequence[dict[str, Any]], label: str) -> dict[str, Any]:
    rows = [s["methods"][label] for s in per_seed]
    groups = list(rows[0]["accuracy_per_group"])

    def stat(values: Sequence[float | None]) -> dict[str, float] | None:
        clean = [v for v in values if v is not None]
        if not clean:
            return None
        mean, std = mean_std(clean)
        return {"mean": mean, "std": std, "values": clean}

    return {
        "accuracy": stat([r["accuracy"] for r in rows]),
        "accuracy_task_shift": stat([r["accuracy_task_shift"] for r in rows]),
        "accuracy_per_group": {g: stat([r["accuracy_per_group"][g] for r in rows])
                               for g in groups},
        "task_vector_auc_round1": stat([r["task_vector_auc_round1"] for r in rows]),
        "task_vector_auc_mean": stat([r["task_vector_auc_mean"] for r in rows]),
    }


def _pm(stat: dict[str, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def main_table(summary: dict[str, Any], labels: Sequence[str]) -> Table:
    groups = list(summary[labels[0]]["accuracy_per_group"])
    table = Table(title="Personalized accuracy (%), mean ± std over seeds",
                  title_justify="left")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("all", justify="right")
    table.add_column("task-shift", justify="right")
    for g in groups:
        table.add_column(g, justify="right")
    table.add_column("TV AUC", justify="right")
    for label in labels:
        row = summary[label]
        table.add_row(method_name(label), _pm(row["accuracy"]),
                      _pm(row["accuracy_task_shift"]),
                      *[_pm(row["accuracy_per_group"][g]) for g in groups],
                      _pm(row["task_vector_auc_mean"], 1.0, 3))
    table.caption = "TV AUC: task-vector cosine AUC, mean over rounds"
    return table


def ablation_table(study: str, rows: Sequence[tuple[str, dict[str, Any]]],
                   oracle: dict[str, Any]) -> Table:
    table = Table(title=f"Ablation: {study}", title_justify="left")
    for column in ("setting", "all", "task-shift", "Δ oracle", "TV AUC"):
        table.add_column(column, justify="left" if column == "setting" else "right",
                         no_wrap=column == "setting")
    for setting, row in rows:
        gap = 100 * (row["accuracy"]["mean"] - oracle["accuracy"]["mean"])
        table.add_row(setting, _pm(row["accuracy"]), _pm(row["accuracy_task_shift"]),
                      f"{gap:+.1f}", _pm(row["task_vector_auc_mean"], 1.0, 3))
    return table


def per_round_auc(per_seed: Sequence[dict[str, Any]], label: str, key: str
                  ) -> list[float]:
    """Mean over seeds of a per-round AUC list."""
    lists = [s["methods"][label][key] for s in per_seed if s["methods"][label].get(key)]
    if not lists:
        return []
    return [mean_std([values[r] for values in lists if r < len(values)])[0]
            for r in range(max(len(v) for v in lists))]


def per_round_table(per_seed: Sequence[dict[str, Any]]) -> Table:
    rows = [(f"{method_name(label)}: the round's step", label,
             "task_vector_auc_per_round") for label in DIAGNOSED]
    rows += [(f"{method_name(label)}: similarity memory (what the weights use)", label,
              "memory_auc_per_round") for label in DIAGNOSED
             if per_round_auc(per_seed, label, "memory_auc_per_round")]
    rows += [(f"{method_name(label)}: cumulative, upload − initial adapter", label,
              "cumulative_auc_per_round") for label in DIAGNOSED]
    n_rounds = max(len(per_round_auc(per_seed, label, key)) for _, label, key in rows)
    table = Table(title="Task-vector AUC per round (mean over seeds)", title_justify="left")
    table.add_column("task vector", no_wrap=True)
    for r in range(n_rounds):
        table.add_column(f"r{r + 1}", justify="right")
    for name, label, key in rows:
        values = per_round_auc(per_seed, label, key)
        table.add_row(name, *[f"{v:.3f}" for v in values])
    return table


def targets(summary: dict[str, Any], raw: dict[str, Any],
            per_seed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    bip, fedit = summary["fedbip-l"], summary["fedit"]
    oracle, local = summary["oracle"], summary["local"]
    shift_gain = 100 * (bip["accuracy_task_shift"]["mean"]
                        - fedit["accuracy_task_shift"]["mean"])
    oracle_gap = 100 * (oracle["accuracy"]["mean"] - bip["accuracy"]["mean"])
    group_gaps = {g: 100 * (bip["accuracy_per_group"][g]["mean"]
                            - local["accuracy_per_group"][g]["mean"])
                  for g in bip["accuracy_per_group"]}
    step_auc = bip["task_vector_auc_mean"]["mean"]
    memory = [v for s in per_seed for v in (s["methods"]["fedbip-l"].get("memory_auc_per_round")
                                            or [])]
    # The target is on the cosines the weights use: the memory's when it is on.
    auc = sum(memory) / len(memory) if memory else step_auc
    return [
        {"target": f"FedBip-L − FedIT on task-shift clients ≥ {TARGET_VS_FEDIT_SHIFT:g} pts",
         "value": f"{shift_gain:+.1f} pts", "met": shift_gain >= TARGET_VS_FEDIT_SHIFT},
        {"target": f"oracle − FedBip-L ≤ {TARGET_VS_ORACLE:g} pts",
         "value": f"{oracle_gap:.1f} pts", "met": oracle_gap <= TARGET_VS_ORACLE},
        {"target": "FedBip-L ≥ local only in every group",
         "value": ", ".join(f"{g} {v:+.1f}" for g, v in group_gaps.items()),
         "met": all(v >= 0 for v in group_gaps.values())},
        {"target": f"task-vector AUC ≥ {TARGET_AUC} (every round, FedBip-L, the cosines "
                   "its weights use)",
         "value": f"{auc:.3f} ({'similarity memory' if memory else 'the round step'}; the "
                  f"round's step alone {step_auc:.3f}, round 1 "
                  f"{bip['task_vector_auc_round1']['mean']:.3f}); raw parameters "
                  f"{raw['auc']['mean']:.3f}",
         "met": auc >= TARGET_AUC},
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--quick", action="store_true",
                        help="The demo's --quick scenario, one seed: a smoke test.")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                        "--quick writes nothing unless given).")
    parser.add_argument("--work", type=Path, default=None,
                        help="Scratch folder (default: a temporary one, removed).")
    parser.add_argument("--render-heatmaps", action="store_true",
                        help="Render the model cards' heatmaps as the server job does.")
    parser.add_argument("--threads", type=int, default=1, help="Torch CPU threads.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if not args.render_heatmaps:
        stub_heatmaps()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s.strip()]
    make_config = quick_config if args.quick else full_config

    main_methods = default_methods(FEDBIP_OPTIONS)
    variants = [] if args.no_ablations else ablations(FEDBIP_OPTIONS)
    by_key = {_key(m.strategy): m.label for m in main_methods}
    methods = list(main_methods)
    variant_labels = []
    for index, variant in enumerate(variants):
        key = _key(variant.strategy)
        if key not in by_key:
            label = f"ablation-{index}"
            by_key[key] = label
            methods.append(Method(label, variant.strategy, variant.setting))
        variant_labels.append(by_key[key])

    config = make_config(seeds[0])
    console.print(f"[bold]Quality benchmark[/]: {len(config.groups)} clients, "
                  f"{config.rounds} rounds, seeds {seeds}, {len(methods)} federations per "
                  f"seed (FedBip options {FEDBIP_OPTIONS}).")
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedbip-quality-"))
    per_seed = []
    try:
        for seed in seeds:
            per_seed.append(run_seed(seed, make_config(seed), methods, work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - began

    summary = {m.label: aggregate(per_seed, m.label) for m in methods}
    raw = {}
    for k in ("auc", "mean_same", "mean_different"):
        mean, std = mean_std([s["raw_parameters_round1"][k] for s in per_seed])
        raw[k] = {"mean": mean, "std": std}
    labels = [m.label for m in main_methods]
    console.print()
    console.print(main_table(summary, labels))
    tv_round1 = summary["fedbip-l"]["task_vector_auc_round1"]
    console.print(f"Similarity AUC (same vs different task pairs): task vectors round 1 "
                  f"{_pm(tv_round1, 1.0, 3)}, every round "
                  f"{_pm(summary['fedbip-l']['task_vector_auc_mean'], 1.0, 3)}; raw "
                  f"parameters (base + ΔW + head, round 1) {raw['auc']['mean']:.3f} ± "
                  f"{raw['auc']['std']:.3f}, mean cosine same "
                  f"{raw['mean_same']['mean']:.5f} vs different "
                  f"{raw['mean_different']['mean']:.5f}.", highlight=False)
    console.print()
    console.print(per_round_table(per_seed))
    ablation_rows: dict[str, list] = {}
    for variant, label in zip(variants, variant_labels, strict=True):
        ablation_rows.setdefault(variant.study, []).append((variant.setting, summary[label]))
    for study, rows in ablation_rows.items():
        console.print()
        console.print(ablation_table(study, rows, summary["oracle"]))
    checks = targets(summary, raw, per_seed)
    console.print()
    table = Table(title="Targets (issue 4), means over seeds", title_justify="left")
    for column in ("target", "measured", "met"):
        table.add_column(column)
    for check in checks:
        table.add_row(check["target"], check["value"],
                      "[green]yes[/]" if check["met"] else "[red]no[/]")
    console.print(table)
    console.print(f"Total {seconds / 60:.1f} min.")

    results = {
        "benchmark": "quality", "quick": args.quick, "seeds": seeds,
        "scenario": config.to_json(),
        "fedbip_options": FEDBIP_OPTIONS,
        "methods": {m.label: {"description": m.description,
                              "strategy": m.strategy.model_dump(mode="json"),
                              **summary[m.label]} for m in methods},
        "main_methods": labels,
        "ablations": [{"study": v.study, "setting": v.setting, "method": label}
                      for v, label in zip(variants, variant_labels, strict=True)],
        "raw_parameter_similarity": raw,
        "auc_per_round": {f"{label}/{key}": per_round_auc(per_seed, label, key)
                          for label in DIAGNOSED
                          for key in ("task_vector_auc_per_round",
                                      "cumulative_auc_per_round")},
        "targets": checks,
        "per_seed": per_seed,
        "heatmaps_rendered": args.render_heatmaps,
        "seconds": round(seconds, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": args.threads},
    }
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"Wrote {out}.")
    return results


if __name__ == "__main__":
    main()
