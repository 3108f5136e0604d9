"""``fedbip demo``: the whole federation, offline, with a tiny model and synthetic tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import JsonOption, err_console, handle_errors, out_console, print_json


@handle_errors
def demo(
    directory: Annotated[Path, typer.Option(
        "--dir", file_okay=False,
        help="Demo folder: base-model cache, federations, results.")] = Path("fedbip-demo"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="A reduced run (6 clients, 3 rounds), under a minute.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of data, model and training.")] = 0,
    threads: Annotated[int, typer.Option(
        help="Torch CPU threads (the model is tiny: one thread is usually fastest).")] = 1,
    json_output: JsonOption = False,
) -> None:
    """Run a whole federation offline and compare FedBip with its baselines.

    Pre-trains a small Llama on a mixture of synthetic tasks (cached in --dir), then, for
    each method (local only, FedIT, FedAvg, uniform, FedBip, FedBip-L, the oracle), runs a
    local-folder federation of clients with conflicting tasks through train → push →
    server round → pull, over asynchronous rounds; prints personalized accuracy and how
    well task-vector vs raw-parameter cosines separate the task groups; writes
    similarity.png and results.json into --dir.

    Examples:

      fedbip demo --quick

      fedbip demo --dir fedbip-demo --json
    """
    import time

    import torch

    from fedbip_hub.demo import run_demo
    from fedbip_hub.demo.report import render

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    began = time.perf_counter()
    try:
        log = None if json_output else (lambda line: err_console.print(line, highlight=False))
        results = run_demo(directory, quick=quick, seed=seed, log=log)
    finally:
        torch.set_num_threads(previous)
    results["wall_seconds"] = round(time.perf_counter() - began, 1)
    if json_output:
        print_json(results)
        return
    out_console.print()
    render(results, out_console)


def register_demo_commands(app: typer.Typer) -> None:
    app.command()(demo)
