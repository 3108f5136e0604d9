"""How many Hub API calls a round costs, counted at a local Hub-compatible server.

Builds a federation of K members on fedbip_hub.testing.hub_server (a tiny 2-layer Llama
built from a config; nothing is downloaded), runs a first round, then measures, as the
server counts real HTTP requests (the Hub's rate limits count API calls, commits
included, and file downloads separately):

- idle: a round with nothing new, on the same cache (a job on the same machine) and on
  an empty cache (a job on a fresh machine, as HF Jobs runs one);
- fresh F: a round after F members pushed new uploads; A is how many personalized
  adapters it changed (published). The budget is 6 + 4·F + 3·A API calls.

    python benchmarks/bench_hub_calls.py            # K = 5, 20, 50
    python benchmarks/bench_hub_calls.py --quick    # K = 5 (a smoke test)
    python benchmarks/bench_hub_calls.py --k 100 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ORG = "fedorg"
TOKEN = "hf_bench_hub_calls_token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _hub_environment(home: Path) -> int:
    """Point huggingface_hub at a local server (before it is imported: it freezes
    HF_ENDPOINT on import); returns the port."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("run this benchmark as a script: huggingface_hub is already "
                           "imported with another endpoint")
    port = _free_port()
    os.environ.update({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN,
                       "HF_HOME": str(home / "hf-home"), "HF_HUB_DISABLE_XET": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(name, None)
    return port


def _tiny_base(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=0, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


def _measure(server, fed, label: str, **extra) -> dict:
    from fedbip_hub.server.rounds import run_round

    since = len(server.requests)
    started = time.perf_counter()
    record = run_round(fed)
    counts = server.request_counts(since)
    return {"scenario": label, "status": record["status"], **counts,
            "published": len(record.get("outputs") or {}),
            "unchanged": len(record.get("unchanged") or {}),
            "recorded": record.get("hub"), "seconds": round(time.perf_counter() - started, 2),
            **extra}


def bench_k(server, base: Path, root: Path, k: int, fresh: int, method: str) -> list[dict]:
    from fedbip_hub.federation.client import init_federation, join, pull, push
    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.federation.repo import Federation
    from fedbip_hub.server.rounds import run_round
    from fedbip_hub.testing.uploads import write_upload

    repo_id = f"{ORG}/bench-{k}"
    config = FederationConfig(name=f"bench-{k}", base_model=str(base), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8), strategy={"method": method})
    fed = init_federation(repo_id, config)
    names = [f"m{i:03d}" for i in range(k)]
    for i, name in enumerate(names):
        join(fed, name)
        upload = write_upload(fed.init_folder(), root / f"up-{k}-{name}", seed=i, group=i % 3,
                         rank=4)
        push(fed, name, upload, n_examples=10)
    run_round(fed)  # the first round: every member fresh
    rows = [_measure(server, fed, "idle (same cache)")]
    new_job = Federation.at(repo_id, cache_dir=root / f"cache-{k}-new-job")
    rows.append(_measure(server, new_job, "idle (empty cache)"))
    for count in sorted({1, fresh}):
        for i, name in enumerate(names[:count]):
            pulled = pull(fed, name, root / f"pulled-{k}-{name}-{count}").folder
            upload = write_upload(pulled, root / f"up2-{k}-{name}-{count}", seed=100 + i,
                             group=i % 3, rank=None)
            shutil.copy(pulled / "fedbip_start.json", upload)
            push(fed, name, upload, n_examples=10)
        row = _measure(server, fed, f"fresh F={count}", fresh=count)
        row["budget"] = 6 + 4 * count + 3 * row["published"]
        rows.append(row)
    for row in rows:
        row["k"] = k
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=None,
                        help="federation sizes (default: 5 20 50; --quick: 5)")
    parser.add_argument("--quick", action="store_true", help="K = 5 only: a smoke test")
    parser.add_argument("--method", default="fedbip-l", help="the federation's method")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    sizes = args.k or ([5] if args.quick else [5, 20, 50])
    home = Path(tempfile.mkdtemp(prefix="fedbip-bench-hub-"))
    try:
        port = _hub_environment(home)
        from fedbip_hub.testing.hub_server import HubServer

        server = HubServer(port, token=TOKEN, orgs=(ORG,)).start()
        try:
            base = _tiny_base(home / "base")
            rows = [row for k in sizes
                    for row in bench_k(server, base, home, k, max(2, k // 10), args.method)]
        finally:
            server.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'K':>4}  {'scenario':<20}{'API calls':>10}{'downloads':>10}{'commits':>8}"
          f"{'A':>5}{'budget':>8}")
    for row in rows:
        budget = row.get("budget", "")
        print(f"{row['k']:>4}  {row['scenario']:<20}{row['api']:>10}{row['downloads']:>10}"
              f"{row['commits']:>8}{row['published']:>5}{budget!s:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
