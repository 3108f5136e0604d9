"""Engine benchmark (issue 2): exact low-rank similarity and merge vs brute force and PEFT.

Everything is measured side by side in one run, on Llama-7B attention shapes (q/k/v/o
projections, 4096×4096, LoRA rank 16, float32):

(a) similarity of K=32 task vectors: our factored Gram (``similarity.module_gram`` →
    ``lowrank.lowrank_gram``) vs a brute force that materialises every ΔW and takes
    cosines of the flattened matrices. Wall time, working memory (fresh subprocess per
    method, peak RSS minus RSS after imports and inputs), and cosine agreement.
(b) one personalized merge of K=8 adapters to rank 16: ``merge.personalize`` (QR + small
    SVD of stacked factors) vs PEFT's ``add_weighted_adapter(combination_type="svd")``
    on a toy model with the same Linear shapes and the same factors, plus the exact
    ``cat`` variants. Wall time and Frobenius error against the exact weighted sum.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py            # full run, ~2 min on 2 idle cores
    .venv/bin/python benchmarks/bench_engine.py --quick    # d=512, ~10 s

The full run uses one Llama-7B block (4 modules): PEFT's svd merge costs ~13 s per module
on 2 idle cores (a full 4096×4096 SVD each), and every ratio here is per module, so more
blocks (``--layers 2``) only lengthen the run. On a shared machine, expect several times
longer: 2-thread BLAS kernels slow down badly when other processes take the cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import fedbip_hub.engine.merge as merge_module
from fedbip_hub.adapters.lora import PEFT_PREFIX, LoraAdapter
from fedbip_hub.engine.lowrank import refactorize, refactorize_qr
from fedbip_hub.engine.merge import MergePlan, personalize
from fedbip_hub.engine.similarity import SimilarityReport, compute_similarity, module_gram
from fedbip_hub.engine.stacked_merge import Merged
from fedbip_hub.engine.strategies import Strategy, compute_weights
from fedbip_hub.engine.task_vectors import LowRankDelta, TaskVector

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "engine.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Targets of issue 2.
TARGET_SIM_SPEEDUP = 5.0
TARGET_SIM_MEMORY = 50.0
TARGET_SIM_COS_DIFF = 1e-4
TARGET_MERGE_SPEEDUP = 10.0
# "ours ≤ PEFT's" is judged with this relative slack: both are optimal truncations
# computed in float32, so they may differ by rounding only.
ERROR_SLACK = 1e-5
CAT_EXACT = 1e-5


@dataclass(frozen=True)
class Config:
    d: int = 4096
    r: int = 16
    alpha: float = 32.0
    layers: int = 1
    k_sim: int = 32
    k_merge: int = 8
    groups_sim: int = 4
    groups_merge: int = 2
    repeats: int = 3
    fast_repeats: int = 5
    peft_repeats: int = 1
    seed: int = 0
    threads: int = 1
    cpu_clock: bool = False  # time in process CPU time (see interleaved)

    @property
    def modules(self) -> list[str]:
        return [f"model.layers.{layer}.self_attn.{proj}"
                for layer in range(self.layers) for proj in PROJECTIONS]

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# ----------------------------------------------------------------------------- inputs
Factors = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # module -> K × (B, A)


def make_factors(cfg: Config, k: int, seed: int, groups: int) -> Factors:
    """K clients' LoRA factors (B d×r, A r×d) per module, client c in task group c % groups.

    A client's factors are its group's centre plus noise of 0.7× the centre's size, so
    same-group ΔW cosines are ~0.4 and cross-group ones ~0: a spread like real uploads.
    """
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for module in cfg.modules:
        centres = [(torch.randn(cfg.d, cfg.r, generator=gen) * 0.02,
                    torch.randn(cfg.r, cfg.d, generator=gen) / math.sqrt(cfg.d))
                   for _ in range(groups)]
        clients = []
        for c in range(k):
            b0, a0 = centres[c % groups]
            b = b0 + 0.7 * 0.02 * torch.randn(cfg.d, cfg.r, generator=gen)
            a = a0 + 0.7 / math.sqrt(cfg.d) * torch.randn(cfg.r, cfg.d, generator=gen)
            clients.append((b.contiguous(), a.contiguous()))
        out[module] = clients
    return out


def as_deltas(cfg: Config, factors: Factors) -> dict[str, list[LowRankDelta]]:
    """ΔW = s·B·A as factor pairs (U = s·B, V = A), what the engine works on."""
    return {m: [LowRankDelta(b * cfg.scale, a) for b, a in pairs] for m, pairs in factors.items()}


def write_peft_adapter(folder: Path, cfg: Config, factors: Factors, client: int) -> Path:
    """Write one client as a PEFT LoRA adapter folder (PEFT's config and key names)."""
    from peft import LoraConfig

    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(PROJECTIONS),
               lora_dropout=0.0).save_pretrained(str(folder))
    tensors = {}
    for module, pairs in factors.items():
        b, a = pairs[client]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


# ----------------------------------------------------------------------------- helpers
def interleaved(methods: dict[str, tuple[Callable[[], object], int]], rounds: int,
                clock: Callable[[], float] = time.perf_counter
                ) -> dict[str, tuple[list[float], object]]:
    """Time several methods in alternation: each round runs every method its per-round
    count of times, so that a load change on a shared machine hits all of them alike.
    ``clock`` may be ``time.process_time`` (CPU time, single-threaded runs on a machine
    other processes load).

    Returns, per method, every timing and its last result.
    """
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, object] = {}
    for _ in range(rounds):
        for name, (fn, per_round) in methods.items():
            for _ in range(per_round):
                results[name] = None
                gc.collect()
                start = clock()
                results[name] = fn()
                times[name].append(clock() - start)
    return {name: (times[name], results[name]) for name in methods}


def available_cpus() -> int:
    """The CPUs this process may use (its affinity, where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_child(script: str | Path, kind: str, config: dict) -> dict:
    """Run ``script --child kind --child-config JSON`` in a fresh process, with the
    repository root on its PYTHONPATH; return the JSON object it prints last."""
    cmd = [sys.executable, str(script), "--child", kind, "--child-config", json.dumps(config)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _proc_status(field: str) -> int | None:
    """A /proc/self/status field in bytes (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print(line)
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            print(line)
    print(line)


# ----------------------------------------------------------------- (a) similarity
def similarity_ours(deltas: dict[str, list[LowRankDelta]], clients: list[str]
                    ) -> SimilarityReport:
    """Our path: one K×K Gram per module from the stacked factors, never d×d."""
    report = SimilarityReport(clients=clients)
    for module, module_deltas in deltas.items():
        report.grams[module] = module_gram(module_deltas).to(torch.float64)
    report.model_cosine()
    return report


def similarity_brute(deltas: dict[str, list[LowRankDelta]], clients: list[str]
                     ) -> SimilarityReport:
    """Brute force: materialise all K ΔW of a module into one K×(d_out·d_in) buffer, Gram
    of the flattened rows, module after module (one module's K matrices live at a time:
    the cheapest brute force that still forms every ΔW once)."""
    report = SimilarityReport(clients=clients)
    buffer: torch.Tensor | None = None
    for module, module_deltas in deltas.items():
        d_out, d_in = module_deltas[0].u.shape[0], module_deltas[0].v.shape[1]
        if buffer is None or buffer.shape[1] != d_out * d_in:
            buffer = torch.empty(len(module_deltas), d_out * d_in)
        for k, delta in enumerate(module_deltas):
            torch.mm(delta.u, delta.v, out=buffer[k].view(d_out, d_in))
        report.grams[module] = (buffer @ buffer.T).to(torch.float64)
    report.model_cosine()
    return report


SIM_METHODS = {"ours": similarity_ours, "brute": similarity_brute}


def all_cosines(report: SimilarityReport) -> dict[str, torch.Tensor]:
    out = {}
    for granularity in ("model", "layer", "module"):
        for key, cos in report.cosines(granularity).items():
            out[f"{granularity}:{key}"] = cos
    return out


def max_cos_diff(a: SimilarityReport, b: SimilarityReport) -> float:
    ca, cb = all_cosines(a), all_cosines(b)
    return max(float((ca[key] - cb[key]).abs().max()) for key in ca)


def memory_child(cfg: Config, method: str) -> dict:
    """Run in a fresh process: build inputs, warm up, then measure one call's peak RSS."""
    torch.set_num_threads(cfg.threads)
    deltas = as_deltas(cfg, make_factors(cfg, cfg.k_sim, cfg.seed, cfg.groups_sim))
    clients = [f"c{k}" for k in range(cfg.k_sim)]
    fn = SIM_METHODS[method]
    # Warm-up on tiny shapes: thread pools and BLAS buffers are not the method's memory.
    tiny_cfg = Config(d=64, r=cfg.r, layers=1)
    tiny = as_deltas(tiny_cfg, make_factors(tiny_cfg, cfg.k_sim, cfg.seed, cfg.groups_sim))
    fn(tiny, clients)
    gc.collect()
    rss_before = _proc_status("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak_rss()
    hwm_before = _proc_status("VmHWM")
    start = time.perf_counter()
    report = fn(deltas, clients)
    seconds = time.perf_counter() - start
    hwm_after = _proc_status("VmHWM")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del report
    if reset and hwm_after is not None:
        peak = hwm_after
    else:  # ru_maxrss cannot be reset: it only says something if the call raised it
        peak = maxrss_after if maxrss_after > maxrss_before else None
    return {
        "method": method,
        "rss_before_bytes": rss_before,
        "peak_reset": reset and hwm_before is not None,
        "peak_rss_bytes": peak,
        "ru_maxrss_before_bytes": maxrss_before,
        "ru_maxrss_after_bytes": maxrss_after,
        "working_bytes": (peak - rss_before) if None not in (peak, rss_before) else None,
        "seconds": seconds,
    }


def measure_memory(cfg: Config, method: str) -> dict:
    result = run_child(Path(__file__).resolve(), method, asdict(cfg))
    # Recorded, not used: on Linux a child's ru_maxrss (and so RUSAGE_CHILDREN) starts at
    # the parent's RSS when it forked, which here holds the brute-force buffers. The
    # child's own VmHWM, reset just before the call, is what the working memory uses.
    result["rusage_children_maxrss_bytes"] = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return result


def bench_similarity(cfg: Config, workdir: Path) -> dict:
    print(f"\n(a) similarity: K={cfg.k_sim} clients, {len(cfg.modules)} modules "
          f"{cfg.d}×{cfg.d}, r={cfg.r}, float32, {cfg.repeats} repeats", flush=True)
    clients = [f"c{k}" for k in range(cfg.k_sim)]
    factors = make_factors(cfg, cfg.k_sim, cfg.seed, cfg.groups_sim)
    deltas = as_deltas(cfg, factors)

    # float64 low-rank reference, to say which float32 result is closer to the truth.
    ref64 = similarity_ours({m: [LowRankDelta(d.u.double(), d.v.double()) for d in ds]
                             for m, ds in deltas.items()}, clients)
    # Engine path from disk: compute_similarity over TaskVectors of PEFT adapter folders.
    folders = [write_peft_adapter(workdir / f"sim{k}", cfg, factors, k)
               for k in range(cfg.k_sim)]
    vectors = [TaskVector(LoraAdapter(f, label=f"c{k}"), name=f"c{k}")
               for k, f in enumerate(folders)]

    similarity_ours(deltas, clients)  # warm-up of the fast paths
    compute_similarity(vectors)
    per_round = math.ceil(cfg.fast_repeats / cfg.repeats)
    timed = interleaved({
        "ours": (lambda: similarity_ours(deltas, clients), per_round),
        "disk": (lambda: compute_similarity(vectors), per_round),
        "brute": (lambda: similarity_brute(deltas, clients), 1),
    }, rounds=cfg.repeats)
    (ours_times, ours), (disk_times, disk), (brute_times, brute) = (
        timed["ours"], timed["disk"], timed["brute"])
    t_ours, t_disk, t_brute = (statistics.median(t) for t in (ours_times, disk_times,
                                                               brute_times))
    print(f"  ours {fmt_s(t_ours)}, from disk {fmt_s(t_disk)}, brute {fmt_s(t_brute)}",
          flush=True)

    mem_ours = measure_memory(cfg, "ours")
    mem_brute = measure_memory(cfg, "brute")
    print("  memory children done", flush=True)

    cos_diff = max_cos_diff(ours, brute)
    result = {
        "k": cfg.k_sim, "modules": len(cfg.modules), "d": cfg.d, "r": cfg.r,
        "time_ours_s": t_ours, "time_ours_all_s": ours_times,
        "time_brute_s": t_brute, "time_brute_all_s": brute_times,
        "time_ours_from_disk_s": t_disk, "time_ours_from_disk_all_s": disk_times,
        "speedup": t_brute / t_ours,
        "memory_ours": mem_ours, "memory_brute": mem_brute,
        "working_ours_bytes": mem_ours["working_bytes"],
        "working_brute_bytes": mem_brute["working_bytes"],
        "memory_ratio": (mem_brute["working_bytes"] / max(mem_ours["working_bytes"], 1)
                         if None not in (mem_ours["working_bytes"], mem_brute["working_bytes"])
                         else float("nan")),
        "max_abs_cos_diff": cos_diff,
        "max_abs_cos_diff_ours_vs_f64": max_cos_diff(ours, ref64),
        "max_abs_cos_diff_brute_vs_f64": max_cos_diff(brute, ref64),
        "max_abs_cos_diff_disk_vs_ours": max_cos_diff(disk, ours),
        "model_cosine_range": [float(ref64.model_cosine().min()),
                               float(ref64.model_cosine().max())],
    }
    wo, wb = mem_ours["working_bytes"], mem_brute["working_bytes"]
    print_table(
        f"(a) Similarity, K={cfg.k_sim}, {len(cfg.modules)} modules of {cfg.d}×{cfg.d}, r={cfg.r}",
        ["method", "time (median)", "working mem", "peak RSS", "max|Δcos| vs brute",
         "max|Δcos| vs f64"],
        [["ours: low-rank Gram (in memory)", fmt_s(t_ours), fmt_bytes(wo),
          fmt_bytes(mem_ours["peak_rss_bytes"]), f"{cos_diff:.2e}",
          f"{result['max_abs_cos_diff_ours_vs_f64']:.2e}"],
         ["ours: compute_similarity (from disk)", fmt_s(t_disk), "-", "-",
          f"{max_cos_diff(disk, brute):.2e}", f"{max_cos_diff(disk, ref64):.2e}"],
         ["brute force: materialised ΔW", fmt_s(t_brute), fmt_bytes(wb),
          fmt_bytes(mem_brute["peak_rss_bytes"]), "0",
          f"{result['max_abs_cos_diff_brute_vs_f64']:.2e}"],
         ["ratio brute/ours (in memory)", f"{result['speedup']:.1f}×",
          f"{result['memory_ratio']:.0f}×", "", "", ""]],
    )
    print("  working mem = peak RSS of a fresh process during one call minus its RSS just "
          "before\n  (after imports, inputs and a tiny warm-up call; peak reset through "
          "/proc/self/clear_refs).\n  torch's CPU allocations bypass tracemalloc, hence RSS.")
    return result


# ----------------------------------------------------------------------- (b) merge
def build_peft_model(cfg: Config, factors: Factors, k: int):
    """A toy model with Llama-named 4096×4096 projections, K LoRA adapters c0..c{K-1}
    holding exactly our factors (same r, lora_alpha, hence the same scaling)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for proj in PROJECTIONS:
                setattr(self, proj, nn.Linear(cfg.d, cfg.d, bias=False))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attention()

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(cfg.layers))

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def lora_config():
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(PROJECTIONS),
                          lora_dropout=0.0)

    torch.manual_seed(cfg.seed)
    model = get_peft_model(Toy(), lora_config(), adapter_name="c0")
    for c in range(1, k):
        model.add_adapter(f"c{c}", lora_config())
    layers = {name: mod for name, mod in model.base_model.model.named_modules()
              if isinstance(mod, LoraLayer)}
    assert sorted(layers) == sorted(cfg.modules), sorted(layers)
    with torch.no_grad():
        for module, pairs in factors.items():
            layer = layers[module]
            for c, (b, a) in enumerate(pairs):
                layer.lora_A[f"c{c}"].weight.copy_(a)
                layer.lora_B[f"c{c}"].weight.copy_(b)
                assert layer.scaling[f"c{c}"] == cfg.scale
    return model, layers


def exact_sums(cfg: Config, factors: Factors, p: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Σ p_k ΔW_k per module (float64), its squared norm, and the optimal rank-r error²."""
    sums, total, optimal = {}, 0.0, 0.0
    for module, pairs in factors.items():
        u = torch.cat([float(pk) * cfg.scale * b.double() for pk, (b, _) in zip(p, pairs,
                                                                                 strict=True)],
                      dim=1)
        v = torch.cat([a.double() for _, a in pairs], dim=0)
        sums[module] = u @ v
        sigma = refactorize(u, v, cfg.r).singular_values
        total += float((sigma**2).sum())
        optimal += float((sigma[cfg.r:] ** 2).sum())
    return sums, total, optimal


def rel_error(merged: dict[str, torch.Tensor], sums: dict[str, torch.Tensor],
              total: float) -> float:
    err = sum(float(torch.linalg.matrix_norm(merged[m].double() - sums[m]) ** 2)
              for m in sums)
    return math.sqrt(err / total)


def qr_merge_parts(parts, rank, _grams=None) -> Merged:
    """The merge as it was before issue 15: QR of the stacked factors in the compute
    dtype (fp32) and a small SVD, per target (``lowrank.refactorize_qr``)."""
    u = torch.cat([p.u * p.coeff for p in parts], dim=1)
    v = torch.cat([p.v for p in parts], dim=0)
    out = refactorize_qr(u, v, rank)
    return Merged(out.u.cpu(), out.v.cpu(), out.discarded_energy)


def with_qr_merge(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with personalize's merge swapped for the former QR path."""
    def run():
        real = merge_module._merge_parts
        merge_module._merge_parts = qr_merge_parts
        try:
            return fn()
        finally:
            merge_module._merge_parts = real
    return run


def bench_merge(cfg: Config, workdir: Path) -> dict:
    print(f"\n(b) merge: K={cfg.k_merge} adapters → rank {cfg.r}, {len(cfg.modules)} modules "
          f"{cfg.d}×{cfg.d}, float32", flush=True)
    k = cfg.k_merge
    factors = make_factors(cfg, k, cfg.seed + 1, cfg.groups_merge)
    folders = [write_peft_adapter(workdir / f"merge{c}", cfg, factors, c) for c in range(k)]
    vectors = [TaskVector(LoraAdapter(f, label=f"c{c}"), name=f"c{c}")
               for c, f in enumerate(folders)]
    # Target client 0's FedBip weights (model-level cosine, paper normalisation).
    report = compute_similarity(vectors)
    weights = compute_weights(Strategy(method="fedbip"), k=k, report=report)
    p = weights.for_module(cfg.modules[0])[0].to(torch.float64)
    sums, total, optimal_sq = exact_sums(cfg, factors, p)
    optimal = math.sqrt(optimal_sq / total)

    def ours(refactor: str = "svd", targets: Sequence[int] = (0,)):
        plan_t = MergePlan(targets=list(targets),
                           contribution=torch.ones(k, dtype=torch.float64),
                           latest=[None] * len(targets))
        return personalize(vectors, weights, plan_t, rank=cfg.r, refactor=refactor)

    deltas = as_deltas(cfg, factors)

    def ours_in_memory(method: Callable = refactorize):
        out = {}
        for module, ds in deltas.items():
            keep = [(float(pk), d) for pk, d in zip(p, ds, strict=True) if pk != 0]
            u = torch.cat([d.u * pk for pk, d in keep], dim=1)
            v = torch.cat([d.v for _, d in keep], dim=0)
            res = method(u, v, cfg.r)
            out[module] = (res.u, res.v)
        return out

    model, layers = build_peft_model(cfg, factors, k)
    names = [f"c{c}" for c in range(k)]
    peft_weights = [float(x) for x in p]
    created: list[str] = []

    def peft_merge(kind: str) -> str:
        name = f"merged_{kind}{len(created)}"
        created.append(name)
        kwargs = {"svd_rank": cfg.r} if kind == "svd" else {}
        model.add_weighted_adapter(names, peft_weights, name, combination_type=kind, **kwargs)
        return name

    def peft_result(name: str) -> tuple[dict[str, torch.Tensor], int]:
        with torch.no_grad():
            out = {m: layers[m].get_delta_weight(name).double() for m in cfg.modules}
        return out, layers[cfg.modules[0]].r[name]

    # The fast methods run in two interleaved halves, before and after PEFT's slow svd
    # merge, so that all of them see the same spread of machine load.
    fast = {
        "ours": (ours, 1),
        "qr": (with_qr_merge(ours), 1),
        "mem": (ours_in_memory, 1),
        "memqr": (lambda: ours_in_memory(refactorize_qr), 1),
        "all": (lambda: ours(targets=range(k)), 1),
        "allqr": (with_qr_merge(lambda: ours(targets=range(k))), 1),
        "ocat": (lambda: ours("cat"), 1),
        "qrcat": (with_qr_merge(lambda: ours("cat")), 1),
        "pcat": (lambda: peft_merge("cat"), 1),
    }
    for fn, _ in fast.values():  # warm-up
        fn()
    halves = [math.ceil(cfg.fast_repeats / 2), cfg.fast_repeats // 2 or 1]
    clock = time.process_time if cfg.cpu_clock else time.perf_counter
    first = interleaved(fast, rounds=halves[0], clock=clock)
    peft_times, last_svd = [], None
    for _ in range(cfg.peft_repeats):
        gc.collect()
        start = clock()
        last_svd = peft_merge("svd")
        peft_times.append(clock() - start)
        print(f"  peft svd: {fmt_s(peft_times[-1])}", flush=True)
    second = interleaved(fast, rounds=halves[1], clock=clock)
    times = {name: first[name][0] + second[name][0] for name in fast}
    t_ours, t_mem, t_all, t_ocat, t_pcat = (statistics.median(times[n])
                                            for n in ("ours", "mem", "all", "ocat", "pcat"))
    t_qr, t_memqr, t_allqr, t_qrcat = (statistics.median(times[n])
                                       for n in ("qr", "memqr", "allqr", "qrcat"))
    t_peft = statistics.median(peft_times)
    ours_times, mem_times, all_times, ocat_times, pcat_times = (
        times[n] for n in ("ours", "mem", "all", "ocat", "pcat"))

    merged, merged_mem, merged_cat = (second[n][1] for n in ("ours", "mem", "ocat"))
    err_qr = rel_error({m: second["qr"][1][0].delta_weight(m) for m in sums}, sums, total)
    err_qrcat = rel_error({m: second["qrcat"][1][0].delta_weight(m) for m in sums}, sums,
                          total)
    err_ours = rel_error({m: merged[0].delta_weight(m) for m in sums}, sums, total)
    err_mem = rel_error({m: u.double() @ v.double() for m, (u, v) in merged_mem.items()},
                        sums, total)
    err_ocat = rel_error({m: merged_cat[0].delta_weight(m) for m in sums}, sums, total)
    ocat_ranks = sorted({v.shape[0] for _, v in merged_cat[0].modules.values()})
    peft_out, peft_rank = peft_result(last_svd)
    err_peft = rel_error(peft_out, sums, total)
    pcat_out, pcat_rank = peft_result(second["pcat"][1])
    err_pcat = rel_error(pcat_out, sums, total)
    print(f"  ours {fmt_s(t_ours)}, err {err_ours:.6f}; PEFT err {err_peft:.6f}; "
          f"optimal {optimal:.6f}", flush=True)

    result = {
        "k": k, "modules": len(cfg.modules), "d": cfg.d, "rank_out": cfg.r,
        "weights_target0": peft_weights,
        "optimal_rel_error": optimal,
        "svd": {
            "time_ours_s": t_ours, "time_ours_all_s": ours_times, "rel_error_ours": err_ours,
            "time_ours_in_memory_s": t_mem, "time_ours_in_memory_all_s": mem_times,
            "rel_error_ours_in_memory": err_mem,
            "time_ours_all_targets_s": t_all, "time_ours_all_targets_all_s": all_times,
            "time_peft_s": t_peft, "time_peft_all_s": peft_times, "rel_error_peft": err_peft,
            "rank_peft": peft_rank,
            "speedup": t_peft / t_ours,
            "speedup_in_memory": t_peft / t_mem,
            "time_qr_s": t_qr, "time_qr_all_s": times["qr"], "rel_error_qr": err_qr,
            "time_qr_in_memory_s": t_memqr, "time_qr_all_targets_s": t_allqr,
            "speedup_vs_qr": t_qr / t_ours, "speedup_vs_qr_in_memory": t_memqr / t_mem,
            "speedup_vs_qr_all_targets": t_allqr / t_all,
        },
        "cat": {
            "time_ours_s": t_ocat, "time_ours_all_s": ocat_times, "rel_error_ours": err_ocat,
            "ranks_ours": ocat_ranks,
            "time_peft_s": t_pcat, "time_peft_all_s": pcat_times, "rel_error_peft": err_pcat,
            "rank_peft": pcat_rank,
            "speedup": t_pcat / t_ocat,
            "time_qr_s": t_qrcat, "rel_error_qr": err_qrcat, "speedup_vs_qr": t_qrcat / t_ocat,
        },
    }
    print_table(
        f"(b) Personalized merge, K={k} adapters → rank {cfg.r}, {len(cfg.modules)} modules "
        f"of {cfg.d}×{cfg.d}",
        ["method", "time (median)", "speedup vs PEFT", "rel. Frobenius error", "out rank"],
        [["ours: personalize(refactor='svd') from disk", fmt_s(t_ours),
          f"{t_peft / t_ours:.0f}×", f"{err_ours:.6f}", cfg.r],
         ["  former QR path, from disk", fmt_s(t_qr), f"{t_peft / t_qr:.0f}×",
          f"{err_qr:.6f}", cfg.r],
         ["ours: refactorize on stacked factors (in memory)", fmt_s(t_mem),
          f"{t_peft / t_mem:.0f}×", f"{err_mem:.6f}", cfg.r],
         ["  former QR path, in memory", fmt_s(t_memqr), f"{t_peft / t_memqr:.0f}×", "-",
          cfg.r],
         [f"ours: personalize, all {k} targets at once", fmt_s(t_all),
          f"{k * t_peft / t_all:.0f}× vs {k} PEFT calls", "-", cfg.r],
         [f"  former QR path, all {k} targets", fmt_s(t_allqr),
          f"{k * t_peft / t_allqr:.0f}× vs {k} PEFT calls", "-", cfg.r],
         ["PEFT add_weighted_adapter('svd', svd_rank)", fmt_s(t_peft), "1×",
          f"{err_peft:.6f}", peft_rank],
         ["optimal rank-r truncation (Eckart–Young, f64)", "-", "-", f"{optimal:.6f}", cfg.r],
         ["ours: personalize(refactor='cat')", fmt_s(t_ocat), f"{t_pcat / t_ocat:.2f}×",
          f"{err_ocat:.2e}", "/".join(map(str, ocat_ranks))],
         ["  former QR path, cat", fmt_s(t_qrcat), f"{t_pcat / t_qrcat:.2f}×",
          f"{err_qrcat:.2e}", "/".join(map(str, ocat_ranks))],
         ["PEFT add_weighted_adapter('cat')", fmt_s(t_pcat), "1×", f"{err_pcat:.2e}",
          pcat_rank]],
    )
    print("  rel. Frobenius error = ‖ΔW_merged − Σ p_k ΔW_k‖_F / ‖Σ p_k ΔW_k‖_F over all "
          "modules,\n  against the exact float64 weighted sum; p = client 0's FedBip weights.")
    return result


# -------------------------------------------------------------------------- main
def machine_info(cfg: Config) -> dict:
    import peft

    cpu_model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle
                              if line.startswith("model name")), None)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "peft": peft.__version__,
        "config": asdict(cfg),
    }


def summary(sim: dict, merge: dict) -> list[dict]:
    svd, cat = merge["svd"], merge["cat"]
    rows = [
        ("(a) similarity speedup (brute / ours)", f"≥ {TARGET_SIM_SPEEDUP:g}×",
         f"{sim['speedup']:.1f}×", sim["speedup"] >= TARGET_SIM_SPEEDUP),
        ("(a) working-memory ratio (brute / ours)", f"≥ {TARGET_SIM_MEMORY:g}×",
         f"{sim['memory_ratio']:.0f}×", sim["memory_ratio"] >= TARGET_SIM_MEMORY),
        ("(a) max |Δcos| ours vs brute", f"≤ {TARGET_SIM_COS_DIFF:g}",
         f"{sim['max_abs_cos_diff']:.1e}", sim["max_abs_cos_diff"] <= TARGET_SIM_COS_DIFF),
        ("(b) merge speedup (PEFT svd / personalize)", f"≥ {TARGET_MERGE_SPEEDUP:g}×",
         f"{svd['speedup']:.0f}×", svd["speedup"] >= TARGET_MERGE_SPEEDUP),
        ("(b) rel. error ours ≤ PEFT's (same rank)", f"≤ {svd['rel_error_peft']:.6f}",
         f"{svd['rel_error_ours']:.6f}",
         svd["rel_error_ours"] <= svd["rel_error_peft"] * (1 + ERROR_SLACK) + ERROR_SLACK),
        ("(b) cat: ours exact", f"≤ {CAT_EXACT:g}", f"{cat['rel_error_ours']:.1e}",
         cat["rel_error_ours"] <= CAT_EXACT),
    ]
    return [{"check": c, "target": t, "measured": m, "pass": bool(ok)} for c, t, m, ok in rows]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced run (d=512, one block, 1 repeat): a few seconds")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default: {DEFAULT_OUT.relative_to(ROOT)} for a "
                        "full run; a --quick run writes nothing unless given)")
    parser.add_argument("--layers", type=int, default=None,
                        help="transformer blocks, 4 modules each (default 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats of the slow methods (default 3, quick 1)")
    parser.add_argument("--peft-repeats", type=int, default=None,
                        help="timed repeats of PEFT's svd merge (default 1: ~13 s/module)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the CPUs this process may use)")
    parser.add_argument("--child", choices=sorted(SIM_METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        cfg = Config(**json.loads(args.child_config))
        print(json.dumps(memory_child(cfg, args.child)))
        return 0

    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    base = Config(d=512, layers=1, repeats=1, fast_repeats=2) if args.quick else Config()
    cfg = Config(**{**asdict(base), "threads": threads,
                    **{k: v for k, v in (("layers", args.layers), ("repeats", args.repeats),
                                         ("peft_repeats", args.peft_repeats))
                       if v is not None}})
    info = machine_info(cfg)
    print(f"torch {info['torch']} ({info['torch_threads']} threads), peft {info['peft']}, "
          f"{info['cpu_count']} CPUs ({info['cpu_model']}), config {asdict(cfg)}")

    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(f"note: load average {load_start[0]:.2f} before the run: other processes share "
              "the CPUs, timings of multi-threaded kernels will be noisy")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        sim = bench_similarity(cfg, Path(tmp))
        merge = bench_merge(cfg, Path(tmp))
    rows = summary(sim, merge)
    print_table("Summary", ["check", "target", "measured", "pass"],
                [[r["check"], r["target"], r["measured"], "PASS" if r["pass"] else "FAIL"]
                 for r in rows])
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()
    note = " (quick run: small shapes, not the reference figures)" if args.quick else ""
    print(f"\ntotal {elapsed:.0f} s{note}")

    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "engine (issue 2)", "quick": args.quick,
                   "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "machine": info, "similarity": sim, "merge": merge, "summary": rows,
                   "total_seconds": elapsed,
                   "load_average_start": list(load_start), "load_average_end": list(load_end)}
        out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    # Quick runs use small shapes, where the targets are not expected to hold.
    return 0 if args.quick or all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
