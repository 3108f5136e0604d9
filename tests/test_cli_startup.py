"""The CLI starts without its heavy dependencies: `--help` and the cheap commands import
neither torch nor transformers, peft or datasets (benchmarks/bench_cli_startup.py, run
here in its quick mode; the test asserts what was imported, never a time)."""

from __future__ import annotations

import json
import subprocess
import sys

from federation_helpers import REPO_ROOT


def test_help_and_cheap_commands_do_not_import_torch():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_cli_startup.py", "--json", "--repeats", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True)
    rows = {row["command"]: row for row in json.loads(result.stdout)["rows"]}
    assert {"fedbip --help", "fedbip-server --help",
            "fedbip-server schedule print cron"} <= set(rows)
    for name, row in rows.items():
        assert row["best_s"] > 0 and row["ratio"] is not None
        if row["cheap"]:
            assert row["heavy_imports"] == [], (name, row)


def test_the_benchmark_sees_a_heavy_import():
    """The check above could pass by never seeing anything: a command that does import
    torch is reported as such."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from bench_cli_startup import heavy_imports
    finally:
        sys.path.pop(0)
    assert "torch" in heavy_imports(["-m", "fedbip_hub.engine.robust"])
    assert heavy_imports(["-m", "cli.main", "--help"]) == []


def test_status_join_and_pull_on_a_federation_do_not_import_torch(tmp_path, tiny_base):
    """The cheap member commands read listings and JSON only: on a real local federation
    (one round run, so pull has an adapter to fetch) none loads the tensor stack."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from bench_cli_startup import heavy_imports
    finally:
        sys.path.pop(0)
    from federation_helpers import new_local_federation

    from fedbip_hub.server.rounds import run_round

    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    address = str(tmp_path / "fed")
    for argv in (["status", address, "--json"],
                 ["join", address, "--client", "dave", "--json"],
                 ["pull", address, "--client", "alice", "--out", str(tmp_path / "p"),
                  "--json"]):
        assert heavy_imports(["-m", "cli.main", *argv]) == [], argv
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
