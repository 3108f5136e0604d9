"""Init benchmark (issue 14 item 3): peak memory of building the initial adapter, with the
base on the meta device against loading the whole base.

A Llama-style base is built from a config and saved once (0.6 GB of fp32 weights by
default, in 4 shards), then each path runs in a fresh subprocess: import, read VmRSS,
reset the peak through ``/proc/self/clear_refs``, build the initial adapter, read VmHWM. The
figure is the peak minus the RSS before the build (the build's own working memory),
and the total peak is reported beside it. Both adapters are compared byte for byte.

Two sources: the local folder, and the same base as a sharded Hub repo on the local
Hub-compatible test server (fedbip_hub.testing.hub_server, over HTTP), where the bytes
each path downloads into a fresh HF cache are measured too. The base is a causal-LM
checkpoint loaded as a classifier (the usual case: the head is new, so the meta path
reads no weight at all); ``--with-head`` saves a classifier instead, whose head the
meta path reads from its shard.

    .venv/bin/python benchmarks/bench_init.py            # 0.6 GB base, ~3 min
    .venv/bin/python benchmarks/bench_init.py --quick    # 80 MB base
"""

from __future__ import annotations

import argparse
import json
import os
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

    from fedbip_hub.federation.config import FederationConfig
    from fedbip_hub.training.models import build_initial_adapter

    config = FederationConfig(name="bench", base_model=base, num_labels=2)
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    began = time.perf_counter()
    build_initial_adapter(config, out, low_memory=low_memory)
    seconds = time.perf_counter() - began
    peak = _vm("VmHWM")
    print(json.dumps({"rss_before": before, "peak": peak, "working": peak - before,
                      "seconds": seconds}))


def _measure(base: str, out: Path, low_memory: bool, env: dict[str, str] | None = None,
             hf_home: Path | None = None) -> dict:
    extra = dict(env or {})
    if hf_home is not None:
        extra["HF_HOME"] = str(hf_home)
    result = subprocess.run(
        [sys.executable, __file__, "--child", base, str(out), str(int(low_memory))],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra})
    row = json.loads(result.stdout.strip().splitlines()[-1])
    if hf_home is not None:
        row["downloaded"] = sum(p.stat().st_size for p in hf_home.rglob("*")
                                if p.is_file() and not p.is_symlink())
    return row


def _same(a: Path, b: Path) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes()
               for n in ("adapter_model.safetensors", "adapter_config.json"))


def _hub_rows(base: Path, tmp: Path) -> dict:
    """Both paths against the base uploaded to a local Hub server."""
    from fedbip_hub.testing.hub_server import HubServer

    token = "hf_bench_init_token"
    server = HubServer(0, token=token, user="bench", orgs=("benchorg",)).start()
    try:
        server.create_repo("benchorg/base", private=True,
                           files={p.name: p.read_bytes() for p in base.iterdir() if p.is_file()})
        env = {"HF_ENDPOINT": server.endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost",
               "no_proxy": "127.0.0.1,localhost"}
        rows = {name: _measure("benchorg/base", tmp / f"hub-{name}", low, env,
                               tmp / f"hf-home-{name}")
                for name, low in (("full_load", False), ("meta", True))}
    finally:
        server.stop()
    rows["identical_adapter"] = _same(tmp / "hub-full_load", tmp / "hub-meta")
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--with-head", action="store_true",
                        help="Save a classifier checkpoint (its head is read, not made).")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1")
        return {}

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    size = SIZES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="fedbip-bench-init-") as name:
        tmp = Path(name)
        base = tmp / "base"
        torch.manual_seed(0)
        config = LlamaConfig(**size, num_attention_heads=16, num_key_value_heads=16,
                             num_labels=2, pad_token_id=0)
        model = (LlamaForSequenceClassification if args.with_head else LlamaForCausalLM)(config)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(base, max_shard_size=f"{max(weight_bytes // 4, 1) // 10**6}MB")
        del model
        local = {"full_load": _measure(str(base), tmp / "full", low_memory=False),
                 "meta": _measure(str(base), tmp / "meta", low_memory=True)}
        local["identical_adapter"] = _same(tmp / "full", tmp / "meta")
        hub = _hub_rows(base, tmp)
    report = {"size": size, "checkpoint": "classifier" if args.with_head else "causal LM",
              "weight_bytes": weight_bytes, "local": local, "hub": hub}
    mib = 2 ** 20
    print(f"base: {weight_bytes / mib:.0f} MiB of fp32 weights, {report['checkpoint']} "
          f"checkpoint in 4 shards ({size})")
    print(f"{'source':<7} {'path':<10} {'working MiB':>12} {'peak RSS MiB':>13} "
          f"{'seconds':>8} {'downloaded MiB':>15}")
    for source, rows in (("local", local), ("hub", hub)):
        for path in ("full_load", "meta"):
            row = rows[path]
            got = f"{row['downloaded'] / mib:>15.2f}" if "downloaded" in row else f"{'–':>15}"
            print(f"{source:<7} {path:<10} {row['working'] / mib:>12.0f} "
                  f"{row['peak'] / mib:>13.0f} {row['seconds']:>8.2f} {got}")
        rows["peak_ratio"] = rows["full_load"]["peak"] / rows["meta"]["peak"]
        rows["working_ratio"] = rows["full_load"]["working"] / max(rows["meta"]["working"], 1)
        print(f"{source}: peak RSS {rows['peak_ratio']:.2f}× (full / meta), working memory "
              f"{rows['working_ratio']:.2f}×, identical adapter: {rows['identical_adapter']}")
    hub["download_ratio"] = hub["full_load"]["downloaded"] / max(hub["meta"]["downloaded"], 1)
    print(f"hub: downloaded {hub['download_ratio']:.0f}× less")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
