"""The README's demo table, rendered from the demo's ``results.json`` (never typed in).

Regenerate after a demo run (``make readme-table`` runs the demo, then this)::

    python -m fedbip_hub.demo.readme_table fedbip-demo/results.json \
        --summary benchmarks/results/demo.json --readme README.md

``--summary`` keeps the few numbers the table needs in a small committed file, from which
a test re-renders the table and compares it with the README's; ``--check`` only compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

START = "<!-- demo-table:start (python -m fedbip_hub.demo.readme_table) -->"
END = "<!-- demo-table:end -->"
DEFAULT_METHOD = "fedbip-l"
ROW_NAMES = {
    "local": "local only",
    "fedit": "FedIT",
    "fedavg": "FedAvg (ΔW)",
    "uniform": "uniform",
    "fedbip": "FedBip",
    "fedbip-l": "FedBip-L",
    "fedbip-m": "FedBip-M",
    "fedbip-l-paper": "FedBip-L, the paper's row normalisation of each round's cosines",
    "oracle": "oracle (uniform within the true group)",
}


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """What the table needs from a results dict (a full ``results.json`` or a summary)."""
    methods = {label: {"accuracy": m["accuracy"],
                       "accuracy_task_shift": m.get("accuracy_task_shift")}
               for label, m in results["methods"].items()}
    config = results.get("config") or {}
    return {"methods": methods, "quick": bool(results.get("quick")),
            "config": {k: config[k] for k in ("rounds", "seed", "n_train", "n_test")
                       if k in config}}


def _pct(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text.replace("-", "−")  # the typographic minus, as in the README's prose


def markdown_table(results: Mapping[str, Any]) -> str:
    """Personalized accuracy per method, the default method in bold."""
    methods = summary(results)["methods"]
    local = methods.get("local", {}).get("accuracy")
    oracle = methods.get("oracle", {}).get("accuracy")
    lines = ["| method | all | task-shift | Δ local | Δ oracle |", "|---|---|---|---|---|"]
    for label, m in methods.items():
        cells = [ROW_NAMES.get(label, label), _pct(m["accuracy"]),
                 _pct(m["accuracy_task_shift"]),
                 _pct(m["accuracy"] - local, signed=True) if local is not None else "–",
                 _pct(m["accuracy"] - oracle, signed=True) if oracle is not None else "–"]
        if label == DEFAULT_METHOD:
            cells = [f"**{c}**" for c in cells]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    """``text`` with the table between the markers replaced (the markers must be there)."""
    if START not in text or END not in text:
        raise ValueError(f"the README has no {START!r} … {END!r} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def readme_block(text: str) -> str:
    """The table currently between the markers."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="fedbip-demo/results.json",
                        help="The demo's results.json, or a summary written by --summary.")
    parser.add_argument("--summary", type=Path, help="Write the table's numbers here.")
    parser.add_argument("--readme", type=Path, help="Rewrite the table in this README.")
    parser.add_argument("--check", action="store_true",
                        help="With --readme: exit 1 if its table differs, change nothing.")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        print(f"error: no results at {path}; run `fedbip demo` first.", file=sys.stderr)
        return 2
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("quick"):
        print("warning: these are --quick results (6 clients, 3 rounds), not the README's "
              "full demo.", file=sys.stderr)
    table = markdown_table(results)
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary(results), indent=2) + "\n",
                                encoding="utf-8")
    if args.readme is None:
        print(table)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    if args.check:
        same = readme_block(text) == table
        print("README table is up to date." if same else
              "README table differs; regenerate it with `make readme-table`.")
        return 0 if same else 1
    args.readme.write_text(replace_block(text, table), encoding="utf-8")
    print(f"Wrote the demo table into {args.readme}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
