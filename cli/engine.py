"""``fedbip similarity`` and ``fedbip merge``: the engine on adapter folders, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import (
    JsonOption,
    err_console,
    handle_errors,
    matrix_table,
    out_console,
    print_json,
)

# Kept literal so that `fedbip --help` does not import torch; a test checks them against
# the registries in fedbip_hub.engine.similarity and fedbip_hub.engine.strategies.
GRANULARITIES = ("model", "layer", "module")
METHOD_NAMES = ("fedbip", "fedbip-l", "fedbip-m", "fedavg", "fedit", "uniform", "local",
                "oracle")

AdapterDirs = Annotated[list[Path], typer.Argument(
    help="Adapter folders (adapter_config.json + adapter_model.safetensors).",
    exists=False)]


@handle_errors
def similarity(
    dirs: AdapterDirs,
    granularity: Annotated[str, typer.Option(
        help=f"Granularity of the printed table: {'|'.join(GRANULARITIES)}.")] = "model",
    space: Annotated[str, typer.Option(
        help="delta: exact ΔW cosines; params: paper-literal (A, B) cosines.")] = "delta",
    plot: Annotated[Path | None, typer.Option(
        dir_okay=False, help="Write a heatmap PNG here.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Task-vector cosine similarity between adapters, per model, layer or module.

    Examples:

      fedbip similarity alice/ bob/ carol/

      fedbip similarity alice/ bob/ carol/ --granularity layer --plot sim.png
    """
    from fedbip_hub.engine.similarity import MODEL_KEY
    from fedbip_hub.errors import ConfigError, did_you_mean
    from fedbip_hub.federation.offline import folder_similarity

    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity {granularity!r}."
                          f"{did_you_mean(granularity, GRANULARITIES)}",
                          hint=f"Use one of {', '.join(GRANULARITIES)}.")
    if space not in ("delta", "params"):
        raise ConfigError(f"unknown space {space!r}.{did_you_mean(space, ('delta', 'params'))}",
                          hint="Use delta or params.")
    report = folder_similarity([str(d) for d in dirs], space=space)  # type: ignore[arg-type]
    chosen = granularity
    if plot is not None:
        from fedbip_hub.federation.plotting import save_heatmap

        panels = {"model": report.model_cosine()}
        if chosen != "model":
            panels.update(report.cosines(chosen))
        save_heatmap(panels, report.clients, plot,
                     source="task-vector cosine of these adapters (from zero)")
    if json_output:
        payload = report.to_json(modules=chosen == "module")
        payload["granularity"] = chosen
        if plot is not None:
            payload["plot"] = str(plot)
        print_json(payload)
        return
    for key, matrix in report.cosines(chosen).items():
        title = "model-level cosine" if key == MODEL_KEY else key
        out_console.print(matrix_table(title, report.clients, matrix.tolist()))
    if plot is not None:
        err_console.print(f"Heatmap written to {plot}")


@handle_errors
def merge(
    dirs: AdapterDirs,
    target: Annotated[str, typer.Option(
        "--for", show_default=False, help="The client to personalize: its name (the "
        "folder's name) or its index in the input order.")],
    out: Annotated[Path, typer.Option(
        file_okay=False, show_default=False,
        help="Folder to write the personalized adapter to.")],
    strategy: Annotated[str, typer.Option(
        help=f"Merge method: {', '.join(METHOD_NAMES)}.")] = "fedbip-l",
    rank: Annotated[int | None, typer.Option(
        "--rank", help="Output LoRA rank (default: the target's rank).")] = None,
    refactor: Annotated[str, typer.Option(
        help="svd: best rank-R approximation; cat: exact, the rank grows.")] = "svd",
    rule: Annotated[str, typer.Option(
        help="evidence (peers that stand out from the background) | zscore (fixed self "
        "share, z-scored peers) | normalize (the paper's) | softmax.")] = "evidence",
    self_share: Annotated[float, typer.Option(help="Self weight of the zscore rule.")] = 0.3,
    keep_negative: Annotated[bool, typer.Option(
        "--keep-negative", help="Subtract conflicting peers (paper-literal).")] = False,
    temperature: Annotated[float, typer.Option(help="Softmax temperature.")] = 0.1,
    top_k: Annotated[int | None, typer.Option(help="Only the k most similar peers.")] = None,
    self_floor: Annotated[float | None, typer.Option(help="Minimum self weight.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Merge first-round adapters into one client's personalized adapter (PEFT-loadable).

    Examples:

      fedbip merge alice/ bob/ carol/ --for alice --out alice-personalized

      fedbip merge alice/ bob/ carol/ --for 0 --out out --strategy fedavg --rank 8
    """
    from fedbip_hub.engine.strategies import Strategy
    from fedbip_hub.federation.offline import merge_folders

    chosen = Strategy.parse(strategy, rank=rank, refactor=refactor, rule=rule,
                            clip_negative=not keep_negative, temperature=temperature,
                            top_k=top_k, self_floor=self_floor, self_share=self_share)
    index = _target_index(target, [str(d) for d in dirs])
    result = merge_folders([str(d) for d in dirs], index, chosen, out)
    rows = {key: [round(float(x), 6) for x in matrix[index]]
            for key, matrix in result.weights.matrices.items()}
    if json_output:
        print_json({"ok": True, "output": str(result.output), "target": result.target,
                    "clients": result.clients, "strategy": chosen.model_dump(),
                    "weights": rows,
                    "max_discarded_energy": result.merged.max_discarded_energy})
        return
    out_console.print(matrix_table(f"{chosen.method} weights of {result.target}",
                                   result.clients, list(rows.values()), row_labels=list(rows)))
    out_console.print(f"Personalized adapter for {result.target} written to {result.output} "
                      f"(max discarded energy {result.merged.max_discarded_energy:.2e}).")


def _target_index(target: str, folders: list[str]) -> int:
    """``--for``: a client's name (as the tables label it: its folder's name), else an
    index in the input order."""
    from fedbip_hub.errors import ConfigError, did_you_mean
    from fedbip_hub.federation.offline import _unique_labels

    names = _unique_labels(folders)
    if target in names:
        return names.index(target)
    try:
        return int(target)  # merge_folders checks the range
    except ValueError:
        raise ConfigError(f"--for {target!r} names none of the adapters "
                          f"({', '.join(names)}).{did_you_mean(target, names)}",
                          hint="Pass a client's name (its folder's name) or its index in "
                          "the input order.") from None


def register_engine_commands(app: typer.Typer) -> None:
    app.command()(similarity)
    app.command()(merge)
