"""CLI start-up benchmark (issue 13): how long `fedbip --help`, `fedbip-server --help` and
the cheap commands take to start, side by side with a bare `python -c pass`.

Each command runs in a fresh subprocess, best of N (the least disturbed run, on a shared
machine): wall time, and the child's CPU time (user + system), which a busy machine
inflates least. A second run under ``python -X importtime`` says whether it imported
torch, transformers, peft or datasets (the heavy imports the CLI must defer to the
commands that need them). The target is under one second for --help and the cheap
commands.

Run from the repository root::

    .venv/bin/python benchmarks/bench_cli_startup.py            # best of 7
    .venv/bin/python benchmarks/bench_cli_startup.py --quick    # best of 2
    .venv/bin/python benchmarks/bench_cli_startup.py --json     # machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets")
TARGET_SECONDS = 1.0
# name → argv after the interpreter; "cheap": must start without the heavy imports.
COMMANDS: dict[str, tuple[list[str], bool]] = {
    "python -c pass": (["-c", "pass"], True),
    "fedbip --help": (["-m", "cli.main", "--help"], True),
    "fedbip-server --help": (["-m", "server_job", "--help"], True),
    "fedbip push --help": (["-m", "cli.main", "push", "--help"], True),
    "fedbip-server schedule print cron": (
        ["-m", "server_job", "schedule", "print", "cron", "acme/fed"], True),
    "fedbip-server schedule create --help": (
        ["-m", "server_job", "schedule", "create", "--help"], True),
}
QUICK = ("python -c pass", "fedbip --help", "fedbip-server --help")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"}
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def time_once(argv: list[str]) -> tuple[float, float]:
    """Wall seconds, and the child's CPU seconds (user + system: what a busy machine
    inflates least)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy top-level packages a command imports (from ``-X importtime``)."""
    if argv[:1] == ["-c"]:
        return []
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=REPO_ROOT,
                            env=_env(), capture_output=True, text=True, check=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
             if line.startswith("import time:")}
    return [name for name in HEAVY if name in names]


def measure(names: list[str], repeats: int) -> list[dict]:
    rows = []
    for name in names:
        argv, cheap = COMMANDS[name]
        runs = [time_once(argv) for _ in range(repeats)]
        times = sorted(wall for wall, _ in runs)
        rows.append({"command": name, "best_s": round(times[0], 3),
                     "median_s": round(times[len(times) // 2], 3),
                     "cpu_s": round(min(cpu for _, cpu in runs), 3),
                     "heavy_imports": heavy_imports(argv), "cheap": cheap})
    bare = rows[0]["best_s"]
    for row in rows:
        row["ratio"] = round(row["best_s"] / bare, 1) if bare else None
        row["under_target"] = row["best_s"] < TARGET_SECONDS
    return rows


def render(rows: list[dict], repeats: int) -> str:
    lines = [f"CLI start-up, best of {repeats} (target < {TARGET_SECONDS:.0f} s; ratio to "
             "`python -c pass`)", ""]
    width = max(len(r["command"]) for r in rows)
    lines.append(f"{'command':<{width}}  {'best s':>7}  {'median s':>8}  {'cpu s':>6}  "
                 f"{'ratio':>6}  heavy imports")
    for r in rows:
        lines.append(f"{r['command']:<{width}}  {r['best_s']:>7.3f}  {r['median_s']:>8.3f}  "
                     f"{r['cpu_s']:>6.3f}  {r['ratio']:>5.1f}×  "
                     f"{', '.join(r['heavy_imports']) or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Best of 2, three commands.")
    parser.add_argument("--repeats", type=int, default=None, help="Runs per command.")
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    names = list(QUICK if args.quick else COMMANDS)
    rows = measure(names, repeats)
    if args.json:
        print(json.dumps({"repeats": repeats, "target_s": TARGET_SECONDS, "rows": rows},
                         indent=2))
    else:
        print(render(rows, repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
