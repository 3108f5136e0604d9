"""Smoke run of the training benchmark (benchmarks/bench_training.py --quick): every
configuration trains through ``train_adapter`` in a fresh subprocess, the old loop runs
beside it, and the results file holds the estimate-vs-peak ratios and the targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_training  # noqa: E402


def test_the_8b_estimates_say_what_fits_24gb() -> None:
    rows = bench_training.llama3_8b_estimates()
    by = {(r["base"], r["gradient_checkpointing"], r["batch_size"], r["seq_len"]): r
          for r in rows}
    assert by[("4bit", True, 1, 2048)]["fits_24gb"]
    assert not by[("bf16", False, 1, 2048)]["fits_24gb"]
    # Checkpointing and quantization each only ever lower the estimate.
    assert by[("4bit", True, 1, 2048)]["total_bytes"] < by[("4bit", False, 1, 2048)][
        "total_bytes"] < by[("bf16", False, 1, 2048)]["total_bytes"]


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "training.json"
    result = bench_training.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["targets"] == result["targets"]
    names = [run["config"]["name"] for run in saved["runs"]]
    assert names == list(bench_training.QUICK_CONFIGS)
    for run in saved["runs"]:
        assert run["peak_bytes"] > 0 and run["seconds_per_step"] > 0
        # A smoke check that estimate and measurement describe the same run.
        assert 0.5 < run["estimate_ratio"] < 2, run["config"]["name"]
    runs = {run["config"]["name"]: run for run in saved["runs"]}
    assert runs["fp32 + checkpointing"]["peak_bytes"] < runs["fp32"]["peak_bytes"]
    timing = saved["old_vs_new"]
    assert len(timing["seconds_per_step"]["new"]) == len(timing["seconds_per_step"]["old"])
    assert timing["slowdown"] == pytest.approx(timing["median_new"] / timing["median_old"])
    assert set(saved["targets"]) == {"estimate_within_20pct", "no_slower_than_1.2x",
                                     "llama3_8b_4bit_checkpointing_fits_24gb"}
