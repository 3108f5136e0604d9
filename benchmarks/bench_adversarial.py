"""Adversarial benchmark: honest clients' personalized accuracy when some clients attack.

The demo's tasks and scenario machinery (``fedbip_hub.demo.scenario``), through the real
path on the local-folder backend (``train_adapter`` → ``client.push`` →
``rounds.run_round`` → pull → train again). Besides the demo's 7 honest clients
(low ×3, even ×2, marked ×2), 2 more clients (22%) attack in every round they upload:
they train normally, then replace their round's task vector τ = upload − start (start:
the personalized adapter they trained from, recorded in the upload) by f(τ) and push
start + f(τ):

* ``scale``: f(τ) = 100·τ;
* ``flip``: f(τ) = −τ;
* ``noise``: f(τ) = Gaussian noise with τ's norm, per module and per head tensor (the
  LoRA modules get rank-r noise ΔW = G₁·G₂, scaled to ‖ΔW_τ‖);
* ``sybil``: one adversary behind every attacker account. The first attacker's update
  is poisoned (its LoRA modules kept, so it still looks like its group's, its classifier
  head flipped: τ_head → −τ_head), and every attacker pushes that same task vector
  (start_A + τ_sybil, each from its own start A): identical copies;
* ``duplicate``: free-riding. Each attacker pushes a copy of an honest member's update of
  this round (``<its task>-1``): start_A + (upload_V − start_V).

The transforms are exact in ΔW space: module m is written with factors
U = [s_P·U_P, U_f], V = [V_P; V_f] (rank 2r), so ΔW = ΔW_start + f(ΔW_τ) to float
precision whatever the start (the round-1 start's B is 0; later starts are not).
Classifier heads (modules_to_save) get start + f(head − start_head).

Methods: FedBip-L as configured by default (similarity memory, sign guard, norm guard
"clip"), with the norm guard "exclude" and "off", and without memory or sign guard (this
round's cosines only, as the paper); FedAvg (norm guard clip, the default for every
method, and off) and FedIT (norm guard clip). FedIT merges in params space (A and B
averaged separately, equal ranks required), so against it the attackers move the factors
themselves: (s·B, A) = start + f(upload − start), noise likewise per factor.

References: "absent" runs the same federation without the attackers (the demo's 7
clients, same data and seeds): the issue's "without the attackers", and the one every Δ
is taken against. "none" keeps the 2 extra clients honest (they help their groups, so it
is the higher of the two). Reported: the honest clients' mean personalized accuracy and
its change under each attack.

The model cards' heatmap is stubbed as in bench_quality.py (render time only).

Run from the repository root::

    .venv/bin/python benchmarks/bench_adversarial.py            # full: 4 seeds
    .venv/bin/python benchmarks/bench_adversarial.py --quick    # smoke test, 1 seed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_quality import stub_heatmaps  # noqa: E402
from fedbip_hub.adapters.lora import LoraAdapter, save_lora_adapter  # noqa: E402
from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME  # noqa: E402
from fedbip_hub.demo import demo_config  # noqa: E402
from fedbip_hub.demo.base_model import BaseModelSpec  # noqa: E402
from fedbip_hub.demo.methods import FEDBIP_OPTIONS, Method  # noqa: E402
from fedbip_hub.demo.metrics import mean_std  # noqa: E402
from fedbip_hub.demo.scenario import Scenario, ScenarioConfig, prepare_dir  # noqa: E402
from fedbip_hub.engine.strategies import Strategy  # noqa: E402
from fedbip_hub.federation.client import START_FILE, read_start_revision  # noqa: E402
from fedbip_hub.federation.config import PERSONALIZED_DIR  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "adversarial.json"
ATTACKS = ("none", "scale", "flip", "noise", "sybil", "duplicate")
COPYING = ("sybil", "duplicate")  # attacks that push (near-)copies of one task vector
CONDITIONS = ("absent", *ATTACKS)
SCALE = 100.0
TARGET_DROP = 1.0  # points of honest accuracy FedBip-L (norm guard) may lose
console = Console(width=None if sys.stdout.isatty() else 120)


def methods() -> list[Method]:
    options = dict(FEDBIP_OPTIONS)
    return [
        Method("fedbip-l", Strategy(method="fedbip-l", **options),
               "FedBip-L, norm guard clip (default)"),
        Method("fedbip-l-exclude", Strategy(method="fedbip-l", norm_guard="exclude",
                                            **options), "FedBip-L, norm guard exclude"),
        Method("fedbip-l-off", Strategy(method="fedbip-l", norm_guard="off", **options),
               "FedBip-L, no norm guard"),
        Method("fedbip-l-round", Strategy(method="fedbip-l", similarity_memory=0,
                                          sign_guard="off", **options),
               "FedBip-L, this round's cosines only (no memory), no sign guard"),
        Method("fedavg", Strategy(method="fedavg"), "FedAvg in ΔW space, norm guard clip"),
        Method("fedavg-off", Strategy(method="fedavg", norm_guard="off"),
               "FedAvg in ΔW space, no norm guard"),
        Method("fedit", Strategy(method="fedit"), "FedAvg of A and B, norm guard clip"),
    ]


def config(seed: int, quick: bool) -> tuple[ScenarioConfig, list[str]]:
    """The demo's scenario (its --quick sizes with ``quick``, else a base model per seed)
    plus attackers, the last clients; returns the config and the attackers' names."""
    if quick:  # two attackers, so that Sybils have copies
        demo, extra, attackers = (demo_config(quick=True, seed=seed), ("low", "even"),
                                  ["low-3", "even-3"])
    else:
        demo = ScenarioConfig(seed=seed, base=BaseModelSpec(seed=seed))
        extra, attackers = ("low", "marked"), ["low-4", "marked-3"]
    return dataclasses.replace(demo, groups=(*demo.groups, *extra)), attackers


def absent_config(cfg: ScenarioConfig, attackers: Sequence[str]) -> ScenarioConfig:
    """The same federation without the attackers. They are the last clients, so the honest
    ones keep their names, data and training seeds (all drawn in client order)."""
    groups = cfg.groups[:len(cfg.groups) - len(attackers)]
    return dataclasses.replace(cfg, groups=groups)


# -- the attack ----------------------------------------------------------------------------
def _start_folder(fed, client: str, folder: Path) -> Path:
    revision = read_start_revision(folder)
    if revision is None:
        return fed.init_folder()
    return fed.store.fetch_folder(fed.member(client).repo_id, revision, PERSONALIZED_DIR)


def _noise_like(norm: float, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    return noise * (norm / max(float(noise.norm()), 1e-30))


def _coefficient(attack: str) -> float:
    """f(τ) = c·τ of the scale and flip attacks."""
    return SCALE if attack == "scale" else -1.0


def attacked_upload(fed, client: str, folder: Path, attack: str, out: Path,
                    gen: torch.Generator, *, params_space: bool = False) -> Path:
    """Write start + f(upload − start) into ``out`` (exact in ΔW space, or on the factors
    A and B themselves with ``params_space``); return it."""
    c = _coefficient(attack)
    upload = LoraAdapter(folder, label=client)
    start = LoraAdapter(_start_folder(fed, client, folder), label=f"{client} start")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in upload.modules:
        uu, vu = (t.double() for t in upload.delta_factors(name))
        us, vs = (t.double() for t in start.delta_factors(name))
        if params_space:  # same rank and scale: (s·B, A) moved as FedIT averages them
            if attack == "noise":
                modules[name] = (
                    us + _noise_like(float((uu - us).norm()), tuple(uu.shape), gen),
                    vs + _noise_like(float((vu - vs).norm()), tuple(vu.shape), gen))
            else:
                modules[name] = (us + c * (uu - us), vs + c * (vu - vs))
        elif attack == "noise":
            tau = uu @ vu - us @ vs
            rank = vu.shape[0]
            g1 = torch.randn((uu.shape[0], rank), generator=gen, dtype=torch.float64)
            g2 = torch.randn((rank, vu.shape[1]), generator=gen, dtype=torch.float64)
            g1 = g1 * (float(tau.norm()) / max(float((g1 @ g2).norm()), 1e-30))
            modules[name] = (torch.cat([us, g1], 1), torch.cat([vs, g2], 0))
        else:
            modules[name] = (torch.cat([(1 - c) * us, c * uu], 1), torch.cat([vs, vu], 0))
    dense = {}
    for name in upload.dense:
        u = upload.dense_tensor(name).double()
        s = start.dense_tensor(name).double() if name in start.dense else torch.zeros_like(u)
        if attack == "noise":
            dense[name] = s + _noise_like(float((u - s).norm()), tuple(u.shape), gen)
        else:
            dense[name] = s + c * (u - s)
    return _write_attack(out, modules, dense, upload.config, folder, params_space=params_space)


def _write_attack(out: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  dense: dict[str, torch.Tensor], config, folder: Path, *,
                  params_space: bool) -> Path:
    """Save an attacker's factors (fp64, cast to fp32) into ``out``, with the honest
    upload's start file and metadata from ``folder``, so the push looks like any other."""
    if out.exists():
        shutil.rmtree(out)
    save_lora_adapter(out, {k: (u.float(), v.float()) for k, (u, v) in modules.items()},
                      config, dense={k: v.float() for k, v in dense.items()},
                      fold_scale="b" if params_space else "balanced")
    for extra in (START_FILE, UPLOAD_METADATA_NAME):
        if (folder / extra).is_file():
            shutil.copyfile(folder / extra, out / extra)
    return out


def transplanted_upload(fed, client: str, folder: Path, source: Path, source_start: Path,
                        out: Path, *, flip_heads: bool = False,
                        params_space: bool = False) -> Path:
    """Write start_A + g(source − source_start) into ``out``, where start_A is the
    attacker's own start and g flips the classifier heads (``flip_heads``) or keeps
    everything; exact in ΔW space (rank-3r factors [U_A, U_s, −U_s0]·[V_A; V_s; V_s0]), or
    on the factors themselves with ``params_space``. Returns ``out``."""
    start = LoraAdapter(_start_folder(fed, client, folder), label=f"{client} start")
    upload, base = LoraAdapter(source), LoraAdapter(source_start)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in upload.modules:
        ua, va = (t.double() for t in start.delta_factors(name))
        us, vs = (t.double() for t in upload.delta_factors(name))
        u0, v0 = (t.double() for t in base.delta_factors(name))
        if params_space:
            modules[name] = (ua + us - u0, va + vs - v0)
        else:
            modules[name] = (torch.cat([ua, us, -u0], 1), torch.cat([va, vs, v0], 0))
    dense = {}
    for name in upload.dense:
        step = upload.dense_tensor(name).double() - (
            base.dense_tensor(name).double() if name in base.dense else 0.0)
        own = (start.dense_tensor(name).double() if name in start.dense
               else torch.zeros_like(step))
        dense[name] = own - step if flip_heads else own + step
    return _write_attack(out, modules, dense, LoraAdapter(folder).config, folder,
                         params_space=params_space)


def check_transplant(fed, client: str, folder: Path, source: Path, source_start: Path,
                     out: Path) -> float:
    """Relative error of ΔW_out − ΔW_start against ΔW_source − ΔW_source_start."""
    done, start = LoraAdapter(out), LoraAdapter(_start_folder(fed, client, folder))
    upload, base = LoraAdapter(source), LoraAdapter(source_start)
    worst = 0.0
    for name in upload.modules:
        want = upload.delta_weight(name) - base.delta_weight(name)
        got = done.delta_weight(name) - start.delta_weight(name)
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-30)))
    return worst


def _pushed_upload(fed, client: str, out: Path) -> tuple[Path, Path]:
    """``client``'s upload now at the head of its repo (copied into ``out``), and the
    start it trained from."""
    from fedbip_hub.federation.client import UPLOAD_FILES

    repo = fed.member(client).repo_id
    folder = fed.store.fetch_folder(repo, fed.store.head(repo), only=UPLOAD_FILES)
    revision = json.loads((folder / UPLOAD_METADATA_NAME).read_text()).get("start_revision")
    start = (fed.init_folder() if revision is None
             else fed.store.fetch_folder(repo, revision, PERSONALIZED_DIR))
    shutil.copytree(folder, out, dirs_exist_ok=True)
    return out, start


def check_exact(fed, client: str, folder: Path, out: Path, attack: str) -> float:
    """Relative error of ΔW_out − ΔW_start against f(ΔW_upload − ΔW_start) (scale/flip)."""
    upload, done = LoraAdapter(folder), LoraAdapter(out)
    start = LoraAdapter(_start_folder(fed, client, folder))
    c = _coefficient(attack)
    worst = 0.0
    for name in upload.modules:
        want = c * (upload.delta_weight(name) - start.delta_weight(name))
        got = done.delta_weight(name) - start.delta_weight(name)
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-30)))
    return worst


def make_hook(attackers: Sequence[str], attack: str, out_root: Path, seed: int,
              checks: list[float]) -> Callable[[Any, str, int, Path], Path]:
    sybil: dict[tuple[str, int], tuple[Path, Path]] = {}  # (federation, round) → update

    def copying(fed, client: str, round_index: int, folder: Path, out: Path,
                params_space: bool) -> Path:
        scratch = out.with_name(f"{out.name}-source")  # out itself is rewritten
        if attack == "duplicate":  # the same task's first client: an honest member
            source, start = _pushed_upload(fed, f"{client.rsplit('-', 1)[0]}-1", scratch)
        else:  # the first attacker's own update, poisoned; everyone pushes a copy
            key = (fed.config().name, round_index)
            if key not in sybil:
                keep = scratch
                shutil.copytree(folder, keep, dirs_exist_ok=True)
                sybil[key] = (keep, _start_folder(fed, client, folder))
            source, start = sybil[key]
        result = transplanted_upload(fed, client, folder, source, start, out,
                                     flip_heads=attack == "sybil",
                                     params_space=params_space)
        if not params_space:
            checks.append(check_transplant(fed, client, folder, source, start, result))
        return result

    def hook(fed, client: str, round_index: int, folder: Path) -> Path:
        if attack == "none" or client not in attackers:
            return folder
        gen = torch.Generator().manual_seed(seed * 1_000_003 + round_index * 101
                                            + attackers.index(client))
        strategy = Strategy.model_validate(fed.config().strategy)
        params_space = strategy.spec.merge_space == "params"
        out = out_root / fed.config().name / client / f"round-{round_index}"
        if attack in COPYING:
            return copying(fed, client, round_index, folder, out, params_space)
        result = attacked_upload(fed, client, folder, attack, out, gen,
                                 params_space=params_space)
        if attack in ("scale", "flip") and not params_space:
            checks.append(check_exact(fed, client, folder, result, attack))
        return result
    return hook


# -- runs ----------------------------------------------------------------------------------
def run_seed(seed: int, quick: bool, work: Path) -> dict[str, Any]:
    cfg, attackers = config(seed, quick)
    with_attackers = Scenario(cfg, work / f"seed-{seed}")
    with_attackers.unscored_if_missing = set(attackers)
    without = Scenario(absent_config(cfg, attackers), work / f"seed-{seed}-absent")
    runs_of = {}
    for scenario in (with_attackers, without):
        scenario.load_base(work / f"base-seed-{seed}")
        runs_of[scenario] = prepare_dir(scenario.root)
    honest = [c.name for c in with_attackers.clients if c.name not in attackers]
    assert honest == [c.name for c in without.clients], "attackers must be the last clients"
    checks: list[float] = []
    out: dict[str, Any] = {"attackers": attackers, "honest": honest, "runs": {}}
    for attack in CONDITIONS:
        scenario = without if attack == "absent" else with_attackers
        runs = runs_of[scenario]
        scenario.upload_hook = make_hook(attackers, attack, work / f"attacked-{seed}",
                                         seed, checks)
        for method in methods():
            began = time.perf_counter()
            run = Method(f"{method.label}--{attack}", method.strategy, method.description)
            result = scenario.run_method(runs, run)
            acc = {c: result.accuracy[c] for c in honest}
            guard = [{"round": r["round"], "skipped": r.get("skipped")}
                     for r in result.rounds if r.get("skipped")]
            shielded = [{"round": r["round"], "sign_guard": r["sign_guard"]}
                        for r in result.rounds if r.get("sign_guard")]
            copies = [{"round": r["round"], "duplicates": r["duplicates"]}
                      for r in result.rounds if r.get("duplicates")]
            honest_accuracy = sum(acc.values()) / len(acc)
            out["runs"][f"{method.label}/{attack}"] = {
                "honest_accuracy": honest_accuracy,
                "honest_accuracy_per_client": acc,
                "attacker_accuracy": {c: result.accuracy.get(c) for c in attackers},
                "skipped": guard,
                "sign_guard": shielded,
                "duplicates": copies,
                "seconds": round(time.perf_counter() - began, 2),
            }
            console.print(f"  [dim]seed {seed}[/] {method.label:17s} {attack:6s} honest "
                          f"{100 * honest_accuracy:.1f}% ({time.perf_counter() - began:.0f}s)",
                          highlight=False)
            shutil.rmtree(runs / run.label, ignore_errors=True)
    for runs in runs_of.values():
        shutil.rmtree(runs, ignore_errors=True)
    out["exactness_max_rel_error"] = max(checks) if checks else None
    return out


def summarize(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method in methods():
        row: dict[str, Any] = {}
        clean = [s["runs"][f"{method.label}/absent"]["honest_accuracy"] for s in per_seed]
        for attack in CONDITIONS:
            values = [s["runs"][f"{method.label}/{attack}"]["honest_accuracy"]
                      for s in per_seed]
            deltas = [v - c for v, c in zip(values, clean, strict=True)]
            mean, std = mean_std(values)
            dmean, dstd = mean_std(deltas)
            row[attack] = {"mean": mean, "std": std, "values": values,
                           "delta_mean": dmean, "delta_std": dstd, "delta_values": deltas}
        summary[method.label] = row
    return summary


def table(summary: dict[str, Any], n_seeds: int) -> Table:
    t = Table(title=f"Honest clients' personalized accuracy (%), mean over {n_seeds} "
              f"seed(s); Δ in points vs the attackers absent", title_justify="left")
    t.add_column("method", style="bold", no_wrap=True)
    for attack in CONDITIONS:
        t.add_column(attack, justify="right")
    for label, row in summary.items():
        cells = [f"{100 * row['absent']['mean']:.1f}"]
        for attack in CONDITIONS[1:]:
            d = 100 * row[attack]["delta_mean"]
            style = "green" if d >= -TARGET_DROP else "red"
            cells.append(f"{100 * row[attack]['mean']:.1f} [{style}]({d:+.1f})[/]")
        t.add_row(label, *cells)
    return t


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3", help="Comma-separated seeds.")
    parser.add_argument("--quick", action="store_true",
                        help="The demo's --quick sizes, one seed, one attacker.")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                        "--quick writes nothing unless given).")
    parser.add_argument("--work", type=Path, default=None,
                        help="Scratch folder (default: a temporary one, removed).")
    parser.add_argument("--threads", type=int, default=1, help="Torch CPU threads.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    stub_heatmaps()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s.strip()]
    cfg, attackers = config(seeds[0], args.quick)
    console.print(f"[bold]Adversarial benchmark[/]: {len(cfg.groups)} clients "
                  f"({len(attackers)} attackers: {', '.join(attackers)}), {cfg.rounds} "
                  f"rounds, seeds {seeds}, attacks {ATTACKS[1:]}.")
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedbip-adversarial-"))
    per_seed = []
    try:
        for seed in seeds:
            per_seed.append(run_seed(seed, args.quick, work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - began
    summary = summarize(per_seed)
    console.print()
    console.print(table(summary, len(seeds)))
    worst = min(summary["fedbip-l"][a]["delta_mean"] for a in ATTACKS[1:])
    met = -100 * worst <= TARGET_DROP
    target = {"target": f"FedBip-L (defaults: norm guard clip) honest accuracy drop ≤ "
                        f"{TARGET_DROP:g} pts under every attack, vs the attackers absent",
              "worst_delta_points": round(100 * worst, 2), "met": met}
    console.print(f"Target: {target['target']}: worst {100 * worst:+.1f} pts → "
                  f"{'[green]met[/]' if met else '[red]not met[/]'}. Exactness of "
                  f"the ΔW transforms (max relative error): "
                  f"{max(s['exactness_max_rel_error'] or 0 for s in per_seed):.1e}. "
                  f"Total {seconds / 60:.1f} min.")
    results = {
        "benchmark": "adversarial", "quick": args.quick, "seeds": seeds,
        "command": " ".join([".venv/bin/python", "benchmarks/bench_adversarial.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "scenario": cfg.to_json(), "attackers": attackers,
        "attackers_fraction": len(attackers) / len(cfg.groups),
        "attacks": {"scale": f"start + {SCALE:g}·τ", "flip": "start − τ",
                    "noise": "start + Gaussian noise with ‖τ‖ (per module / head tensor)",
                    "sybil": "every attacker: start + the first attacker's τ with its "
                             "heads flipped (identical copies)",
                    "duplicate": "each attacker: start + τ of its task's first (honest) "
                                 "client this round (free-riding)"},
        "methods": {m.label: {"description": m.description,
                              "strategy": m.strategy.model_dump(mode="json")}
                    for m in methods()},
        "summary": summary, "target": target, "per_seed": per_seed,
        "seconds": round(seconds, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": args.threads,
                    "cpus": os.cpu_count()},
    }
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"Wrote {out}.")
    return results


if __name__ == "__main__":
    main()
