"""Init benchmark (issue 14 item 3): peak memory of building the initial adapter, with the
base on the meta device against loading the whole base.

A Llama-style base is built from a config and saved once (about 0.4 GB of fp32 weights
by default), then each path runs in a fresh subprocess: import, read VmRSS, reset the
peak through ``/proc/self/clear_refs``, build the initial adapter, read VmHWM. The
figure is the peak minus the RSS before the build (the build's own working memory),
and the total peak is reported beside it. Both adapters are compared byte for byte.

    .venv/bin/python benchmarks/bench_init.py            # ~0.4 GB base
    .venv/bin/python benchmarks/bench_init.py --quick    # ~50 MB base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "init.json"
SIZES = {  # hidden, layers, vocab: fp32 bytes ≈ 4 × params
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 vocab_size=32000),
    "quick": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  vocab_size=8000),
}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(base: str, out: str, low_memory: bool) -> None:
    """One measured build, in this (fresh) process; prints a JSON line."""
    # everything either path imports, imported before the baseline
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForSequenceClassification  # noqa: F401

    from fedbip_hub.federation import FederationConfig
    from fedbip_hub.models import build_initial_adapter

    config = FederationConfig(name="bench", base_model=base, num_labels=2)
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    began = time.perf_counter()
    build_initial_adapter(config, out, low_memory=low_memory)
    seconds = time.perf_counter() - began
    peak = _vm("VmHWM")
    print(json.dumps({"rss_before": before, "peak": peak, "working": peak - before,
                      "seconds": seconds}))


def _measure(base: Path, out: Path, low_memory: bool) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(base), str(out), str(int(low_memory))],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1")
        return {}

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    size = SIZES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="fedbip-bench-init-") as tmp:
        base = Path(tmp) / "base"
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(LlamaConfig(
            **size, num_attention_heads=16, num_key_value_heads=16, num_labels=2,
            pad_token_id=0))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(base)
        del model
        full = _measure(base, Path(tmp) / "full", low_memory=False)
        meta = _measure(base, Path(tmp) / "meta", low_memory=True)
        same = all((Path(tmp) / "full" / n).read_bytes() == (Path(tmp) / "meta" / n).read_bytes()
                   for n in ("adapter_model.safetensors", "adapter_config.json"))
    report = {"size": size, "weight_bytes": weight_bytes, "full_load": full, "meta": meta,
              "working_ratio": full["working"] / max(meta["working"], 1),
              "peak_ratio": full["peak"] / meta["peak"], "identical_adapter": same}
    mib = 2 ** 20
    print(f"base: {weight_bytes / mib:.0f} MiB of fp32 weights ({size})")
    print(f"{'path':<10} {'working MiB':>12} {'peak RSS MiB':>13} {'seconds':>8}")
    for name, row in (("full load", full), ("meta", meta)):
        print(f"{name:<10} {row['working'] / mib:>12.0f} {row['peak'] / mib:>13.0f} "
              f"{row['seconds']:>8.2f}")
    print(f"working memory: {report['working_ratio']:.1f}× less; peak RSS "
          f"{report['peak_ratio']:.2f}× less; identical adapter: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
