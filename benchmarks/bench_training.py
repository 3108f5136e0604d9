"""Training benchmark (issue 14): `fedbip train` on transformers' Trainer.

For a tiny Llama built from a config (no download), each configuration runs in a fresh
subprocess (one thread) through ``train_adapter``:

* peak memory of the training steps: the process's peak resident set (VmHWM, reset
  through ``/proc/self/clear_refs`` when the Trainer starts) minus its resident set just
  before ``train_adapter`` is called, so it counts the loaded base, the LoRA, the
  optimizer and the activations; the loading's own peak is reported apart (a quantized
  load holds the full-precision weights before quantizing them); on a GPU,
  ``torch.cuda.max_memory_allocated``;
* time per optimizer step: (a run of S steps − a run of 0 steps) / S, so loading is
  not counted, and the trainer's own setup is spread over the steps;
* the memory estimate ``train_adapter`` prints (``fedbip_hub.training.memory_estimate``) against
  that peak;

across dtype (fp32, bf16), gradient checkpointing on/off, gradient accumulation (the
same effective batch as 2 × 4 micro-batches), and a bitsandbytes 4-bit and 8-bit base
(bitsandbytes runs them on CPU), also 4-bit under bf16 autocast as QLoRA runs on a GPU
(for seq-cls and the causal LM). The trainer's time per step is compared side by side
with the hand-written loop it replaces (``old_train_adapter`` below, copied from the
previous ``fedbip_hub/training/trainer.py``), interleaved over repeats, medians compared.

Finally, without a GPU, the estimate for a Llama-3-8B-shaped model (built on the meta
device from its config) says whether a 4-bit LoRA SFT step with checkpointing fits a
24 GB GPU.

Targets: estimate within 20% of the measured peak; the trainer no slower than 1.2× the
old loop per step.

Run from the repository root::

    .venv/bin/python benchmarks/bench_training.py          # ~5 min on 2 shared cores
    .venv/bin/python benchmarks/bench_training.py --quick  # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "training.json"
TARGET_ESTIMATE_ERROR = 0.20
TARGET_SLOWDOWN = 1.2
GPU_BUDGET_BYTES = 24 * 10 ** 9  # "24 GB", as GPUs are sold


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 8192
    seq_len: int = 128
    examples: int = 64


QUICK_SIZE = ModelSize(hidden=128, intermediate=344, layers=2, vocab=2048, seq_len=64,
                       examples=32)


@dataclass(frozen=True)
class RunConfig:
    name: str
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    quantize: str | None = None
    task: str = "SEQ_CLS"
    impl: str = "new"
    precision: str = "auto"


CONFIGS = (
    RunConfig("fp32"),
    RunConfig("fp32 + checkpointing", gradient_checkpointing=True),
    RunConfig("bf16", dtype="bf16"),
    RunConfig("bf16 + checkpointing", dtype="bf16", gradient_checkpointing=True),
    RunConfig("fp32, batch 2 × accum 4", batch_size=2, grad_accum=4),
    RunConfig("4bit", quantize="4bit"),
    RunConfig("4bit + checkpointing", quantize="4bit", gradient_checkpointing=True),
    RunConfig("8bit", quantize="8bit"),
    RunConfig("8bit + checkpointing", quantize="8bit", gradient_checkpointing=True),
    # QLoRA as on a GPU: bf16 compute over the fp32 weights prepare_model_for_kbit_training
    # leaves (embeddings, norms, head), so the residual stream stays fp32.
    RunConfig("4bit, bf16 autocast + checkpointing", quantize="4bit", precision="bf16",
              gradient_checkpointing=True),
    RunConfig("causal LM 4bit, bf16 autocast + checkpointing", quantize="4bit",
              precision="bf16", gradient_checkpointing=True, task="CAUSAL_LM"),
    RunConfig("causal LM fp32", task="CAUSAL_LM"),
    RunConfig("causal LM fp32 + checkpointing", task="CAUSAL_LM",
              gradient_checkpointing=True),
)
QUICK_CONFIGS = ("fp32", "fp32 + checkpointing", "fp32, batch 2 × accum 4", "4bit")


# -- the old loop (fedbip_hub/training/trainer.py before the Trainer), kept as the reference -------
def old_train_adapter(fed: Any, client: str, dataset: Any, output_dir: Path, *,
                      args: Any, start: str = "auto") -> Any:
    """The hand-written loop `fedbip train` ran before issue 14, unchanged but for its
    progress bar (off in the benchmark) and its imports."""
    import torch
    from transformers import get_scheduler

    from fedbip_hub.training.args import SCHEDULER_NAMES
    from fedbip_hub.training.data import prepare_dataset
    from fedbip_hub.training.evaluation import (
        check_vocab,
        evaluate_prepared,
        fresh_base,
        iter_batches,
        pad_id_of,
        resolve_device,
    )
    from fedbip_hub.training.numerics import resolve_precision
    from fedbip_hub.training.start import load_start, start_folder
    from fedbip_hub.training.trainer import TrainResult, _save

    began = time.perf_counter()
    head = fed.head()
    config = fed.config(head)
    member = fed.member(client, head)
    task_type = config.task_type
    prepared = prepare_dataset(dataset, task_type=task_type, max_length=args.max_length,
                               num_labels=config.num_labels)
    device = resolve_device(args.device)
    amp_dtype, precision = resolve_precision(args.precision, device)

    torch.manual_seed(args.seed)
    base = fresh_base(config, None)
    check_vocab(base, prepared)
    with tempfile.TemporaryDirectory(prefix="fedbip-start-") as tmp:
        start_dir, start_revision, start_kind = start_folder(fed, client, start, Path(tmp))
        model = load_start(base, start_dir, client)
    if amp_dtype is None:
        model.float()
    else:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    model.to(device)
    pad_id = pad_id_of(model)
    measured = (prepared.select(range(min(args.measure_examples, len(prepared))))
                if args.measure_examples > 0 else None)

    def measure() -> float | None:
        if measured is None:
            return None
        scores = evaluate_prepared(model, measured, task_type=task_type,
                                   batch_size=args.batch_size, device=str(device))
        return float(scores["loss"])

    start_loss = measure()
    steps_per_epoch = math.ceil(len(prepared) / args.batch_size)
    total = (args.max_steps if args.max_steps is not None
             else math.ceil(args.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    warmup = args.warmup_for(total)
    scheduler = get_scheduler(SCHEDULER_NAMES[args.lr_scheduler], optimizer,
                              num_warmup_steps=warmup, num_training_steps=total)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    shuffler = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    rates: list[float] = []

    def batches():
        while True:
            order = torch.randperm(len(prepared), generator=shuffler).tolist()
            yield from iter_batches(prepared, args.batch_size, pad_id=pad_id,
                                    task_type=task_type, order=order)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    torch.manual_seed(args.seed)
    model.train()
    stream = batches()
    for _step in range(total):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        with autocast():
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        if args.max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        rates.append(float(optimizer.param_groups[0]["lr"]))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    end_loss = measure() if total else start_loss
    last_epoch = losses[-min(len(losses), steps_per_epoch):]
    train_loss = sum(last_epoch) / len(last_epoch) if last_epoch else (start_loss or 0.0)
    out = _save(model, Path(output_dir), config, member.repo_id, start_revision,
                len(prepared))
    return TrainResult(output_dir=out, n_examples=len(prepared),
                       start_revision=start_revision, train_loss=float(train_loss),
                       seconds=time.perf_counter() - began, device=str(device), steps=total,
                       start=start_kind, start_loss=start_loss, end_loss=end_loss,
                       precision=precision, losses=losses, learning_rates=rates,
                       lr_scheduler=args.lr_scheduler, warmup_steps=warmup)


# -- one measured run (in a fresh subprocess) ------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def _reset_peak() -> None:
    gc.collect()  # the warm-up run's cyclic garbage (its model) would be freed mid-run
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: a clean baseline
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _world(work: Path, size: ModelSize, task: str) -> tuple[Any, Any]:
    """A federation over a tiny Llama saved in ``work`` (built once, reused), and data."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from fedbip_hub.federation.client import init_federation, join
    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.federation.repo import Federation

    base = work / f"base-{task}"
    address = work / f"fed-{task}"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        hf = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden,
                         intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                         num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                         pad_token_id=0, num_labels=2)
        model_cls = LlamaForCausalLM if task == "CAUSAL_LM" else LlamaForSequenceClassification
        model_cls(hf).save_pretrained(base)
        fed = init_federation(str(address), FederationConfig(
            name=f"bench-{task.lower()}", base_model=str(base), task_type=task,
            num_labels=2 if task == "SEQ_CLS" else None, lora=LoraSpec(r=8, alpha=16)))
        join(fed, "bench")
    fed = Federation.at(str(address))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, size.vocab, (size.examples, size.seq_len), generator=gen)
    if task == "SEQ_CLS":
        rows = [{"input_ids": row.tolist(), "label": int(i % 2)} for i, row in enumerate(ids)]
    else:
        half = size.seq_len // 2
        rows = [{"prompt": row[:half].tolist(), "completion": row[half:].tolist()}
                for row in ids]
    return fed, datasets.Dataset.from_list(rows)


def measure_one(config: RunConfig, size: ModelSize, steps: int, work: Path) -> dict:
    """Peak memory, time per step and the estimate of one configuration (in this
    process, which should be fresh and single-threaded)."""
    import torch

    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    torch.set_num_threads(1)
    fed, data = _world(work, size, config.task)
    args = TrainingArgs(max_steps=steps, batch_size=config.batch_size,
                        grad_accum=config.grad_accum, dtype=config.dtype,
                        precision=config.precision,
                        quantize=config.quantize,
                        gradient_checkpointing=config.gradient_checkpointing,
                        learning_rate=1e-3, max_length=size.seq_len, measure_examples=0,
                        device="cpu")
    if config.impl == "old":
        def run(a: TrainingArgs, out: Path) -> Any:
            return old_train_adapter(fed, "bench", data, out, args=a, start="init")
    else:
        def run(a: TrainingArgs, out: Path) -> Any:
            return train_adapter(fed, "bench", data, out, args=a, start="init",
                                 progress=False)
    # Warm up: every import and lazy initialisation happens before the baseline.
    run(replace(args, max_steps=1), work / "warm")
    cuda = torch.cuda.is_available()
    _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = _status("VmRSS")
    load_peak: list[int] = []
    if config.impl == "new":  # the steps' peak, apart from loading's (a quantized load
        from fedbip_hub.training.hf_trainer import FedbipTrainer  # holds full-precision shards)

        real_train = FedbipTrainer.train

        def train_after_reset(self: Any, *a: Any, **kw: Any) -> Any:
            load_peak.append(_status("VmHWM") - baseline)
            _reset_peak()
            return real_train(self, *a, **kw)

        FedbipTrainer.train = train_after_reset
    began = time.perf_counter()
    result = run(args, work / "out")
    seconds = time.perf_counter() - began
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM") - baseline)
    began = time.perf_counter()
    run(replace(args, max_steps=0), work / "zero")
    fixed = time.perf_counter() - began
    estimate = getattr(result, "memory_estimate", None)
    if estimate is None:  # the old loop prints none: ask the new code for the same run
        from fedbip_hub.training.memory_check import estimate_run
        from fedbip_hub.training.numerics import resolve_numerics

        est = estimate_run(fed.config(), None, fed.init_folder(), args,
                           resolve_numerics(args, torch.device("cpu")), size.seq_len)
        estimate = est.to_dict()
    return {"config": asdict(config), "peak_bytes": int(peak),
            "load_peak_bytes": load_peak[0] if load_peak else None,
            "estimate_bytes": int(estimate["total"]), "estimate": estimate,
            "seconds_per_step": max(seconds - fixed, 0.0) / steps,
            "final_loss": result.losses[-1] if result.losses else None,
            "memory": "cuda max_memory_allocated" if cuda else "VmHWM - VmRSS"}


def _subprocess(config: RunConfig, size: ModelSize, steps: int, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           # freed tensors go back to the OS at once, so the resident set tracks them
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    payload = json.dumps({"config": asdict(config), "size": asdict(size), "steps": steps,
                          "work": str(work)})
    done = subprocess.run([sys.executable, __file__, "--one", payload], env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the 8B-class estimate ---------------------------------------------------------------------
def llama3_8b_estimates() -> list[dict]:
    """Estimates for a Llama-3-8B shape (meta device, no download), LoRA r=16 on q/k/v/o."""
    from peft import LoraConfig
    from transformers import LlamaConfig

    from fedbip_hub.training.memory_estimate import ModelShape, estimate

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=8192)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    shape = ModelShape.from_config(config, task_type="CAUSAL_LM", num_labels=None,
                                   lora_config=lora)
    rows = []
    for quantize, ckpt, batch, seq in (("4bit", True, 1, 2048), ("4bit", True, 4, 1024),
                                       ("4bit", False, 1, 2048), (None, True, 1, 2048),
                                       (None, False, 1, 2048)):
        est = estimate(shape, dtype="bf16", quantize=quantize, batch_size=batch, seq_len=seq,
                       gradient_checkpointing=ckpt, activation_dtype="bf16")
        rows.append({"base": quantize or "bf16", "gradient_checkpointing": ckpt,
                     "batch_size": batch, "seq_len": seq, "n_params": shape.n_params,
                     "total_bytes": est.total, "fits_24gb": est.total <= GPU_BUDGET_BYTES,
                     "estimate": est.to_dict()})
    return rows


# -- the run -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller model, "
                        "fewer configurations and steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=None,
                        help="old-vs-new timing repeats (interleaved)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.one:
        spec = json.loads(opts.one)
        result = measure_one(RunConfig(**spec["config"]), ModelSize(**spec["size"]),
                             spec["steps"], Path(spec["work"]))
        print(json.dumps(result))
        return result

    size = QUICK_SIZE if opts.quick else ModelSize()
    steps = opts.steps or (2 if opts.quick else 8)
    repeats = opts.repeats or (1 if opts.quick else 3)
    configs = [c for c in CONFIGS if not opts.quick or c.name in QUICK_CONFIGS]
    began = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedbip-bench-train-") as tmp:
        for config in configs:
            work = Path(tmp) / config.task
            work.mkdir(exist_ok=True)
            run = _subprocess(config, size, steps, work)
            run["estimate_ratio"] = run["estimate_bytes"] / max(run["peak_bytes"], 1)
            runs.append(run)
            load = run["load_peak_bytes"]
            print(f"{config.name:45s} load {(load or 0) / 2**20:6.1f} MiB  "
                  f"peak {run['peak_bytes'] / 2**20:7.1f} MiB  estimate "
                  f"{run['estimate_bytes'] / 2**20:7.1f} MiB  (×{run['estimate_ratio']:.2f})"
                  f"  {run['seconds_per_step'] * 1e3:7.1f} ms/step", flush=True)
        timing: dict[str, list[float]] = {"new": [], "old": []}
        old_peak = None
        for _ in range(repeats):
            for impl in ("old", "new"):
                work = Path(tmp) / "SEQ_CLS"
                run = _subprocess(RunConfig(f"{impl} loop", impl=impl), size, steps, work)
                timing[impl].append(run["seconds_per_step"])
                if impl == "old":
                    old_peak = run["peak_bytes"]
    new_step, old_step = (statistics.median(timing[k]) for k in ("new", "old"))
    slowdown = new_step / old_step
    errors = [abs(r["estimate_ratio"] - 1) for r in runs]
    eight_b = llama3_8b_estimates()
    headline = eight_b[0]
    result = {
        "benchmark": "training", "quick": opts.quick, "model": asdict(size), "steps": steps,
        "threads": 1, "machine": {"python": platform.python_version(),
                                  "cpus": os.cpu_count()},
        "runs": runs,
        "old_vs_new": {"seconds_per_step": timing, "median_new": new_step,
                       "median_old": old_step, "slowdown": slowdown,
                       "old_peak_bytes": old_peak},
        "llama3_8b": eight_b,
        "targets": {
            "estimate_within_20pct": {"max_error": max(errors),
                                      "met": max(errors) <= TARGET_ESTIMATE_ERROR},
            "no_slower_than_1.2x": {"slowdown": slowdown,
                                    "met": slowdown <= TARGET_SLOWDOWN},
            "llama3_8b_4bit_checkpointing_fits_24gb": {
                "estimate_bytes": headline["total_bytes"], "met": headline["fits_24gb"]},
        },
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    print(f"\ntrainer vs old loop, {steps} steps, median of {repeats}: "
          f"{new_step * 1e3:.1f} vs {old_step * 1e3:.1f} ms/step → ×{slowdown:.2f} "
          f"(target ≤ {TARGET_SLOWDOWN})")
    ratios = ", ".join(f"{r['estimate_ratio']:.2f}" for r in runs)
    print(f"estimate / measured peak: {ratios}; worst error {max(errors):.0%} "
          f"(target ≤ {TARGET_ESTIMATE_ERROR:.0%})")
    for row in eight_b:
        print(f"Llama-3-8B ({row['n_params'] / 1e9:.2f}B), {row['base']} base, checkpointing "
              f"{'on' if row['gradient_checkpointing'] else 'off'}, batch {row['batch_size']}"
              f" × {row['seq_len']}: {row['total_bytes'] / 1e9:.1f} GB → "
              f"{'fits' if row['fits_24gb'] else 'does not fit'} 24 GB")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.out}")
    return result


if __name__ == "__main__":
    main()
