"""benchmarks/bench_hub_calls.py --quick: it runs, and its counts are within the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_hub_calls_quick_is_within_the_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_hub_calls.py"), "--quick", "--json"],
        env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, capture_output=True, text=True,
        timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    idle = [r for r in rows if r["scenario"].startswith("idle")]
    fresh = [r for r in rows if r["scenario"].startswith("fresh")]
    assert len(idle) == 2 and len(fresh) == 2 and {r["k"] for r in rows} == {5}
    for row in idle:
        assert row["status"] == "nothing-new" and row["api"] <= 5 and row["commits"] == 0
        assert row["recorded"]["api_calls"] == row["api"]
    for row in fresh:
        assert row["status"] == "completed" and row["published"] >= row["fresh"]
        assert row["api"] <= row["budget"] == 6 + 4 * row["fresh"] + 3 * row["published"]
        assert row["commits"] == 2 + row["published"]
        # What the round counts of itself is what the server saw.
        assert row["recorded"]["api_calls"] == row["api"]
        assert row["recorded"]["downloads"] == row["downloads"]
