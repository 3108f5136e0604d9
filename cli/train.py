"""``fedbip train|eval``: a member trains its adapter on local data, and scores the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import JsonOption, err_console, handle_errors, out_console, print_json
from cli.federation import ClientOption, FedArg, TokenOption, _fed
from fedbip_hub.training.args import DEFAULT_LR_SCHEDULER

# Checked by fedbip_hub.training.data_files (a ConfigError naming the path), after the
# training options and before any model loads.
DataOption = Annotated[str, typer.Option(
    "--data", show_default=False,
    help="A .jsonl/.json/.csv/.parquet file, or a folder from save_to_disk.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
TextFieldOption = Annotated[str, typer.Option(help="Column holding the text.")]
LabelFieldOption = Annotated[str, typer.Option(help="Column holding the class id (seq-cls).")]
MaxLengthOption = Annotated[int, typer.Option(help="Truncate examples to this many tokens.")]


@handle_errors
def train(
    fed: FedArg,
    client: ClientOption,
    data: DataOption,
    split: Annotated[str | None, typer.Option(
        help="Split of a saved DatasetDict (default train).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Adapter folder to write (default ./fedbip-adapter-CLIENT).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 3.0,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    max_length: MaxLengthOption = 128,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    lr_scheduler: Annotated[str, typer.Option(
        help="Learning-rate schedule after warmup: constant, linear or cosine (the last two "
        "decay to 0).")] = DEFAULT_LR_SCHEDULER,
    warmup_ratio: Annotated[float, typer.Option(
        help="Fraction of the steps spent warming up linearly from 0.")] = 0.0,
    warmup_steps: Annotated[int | None, typer.Option(
        help="Warmup steps (wins over --warmup-ratio).")] = None,
    max_grad_norm: Annotated[float, typer.Option(
        help="Clip the gradients' global norm to this; 0 disables clipping.")] = 1.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed (shuffling, dropout).")] = 0,
    device: DeviceOption = "auto",
    precision: Annotated[str, typer.Option(
        help="Mixed precision: auto, fp32, bf16 or fp16.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="The frozen base's dtype: auto (bf16/fp16 on a GPU, fp32 on CPU), fp32, bf16 "
        "or fp16.")] = "auto",
    quantize: Annotated[str | None, typer.Option(
        help="Load the base in 4bit or 8bit through bitsandbytes (QLoRA); the adapter "
        "stays a plain LoRA.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute activations in the backward pass "
        "(less memory, ~30% slower).")] = False,
    grad_accum: Annotated[int, typer.Option(
        help="Micro-batches of --batch-size per optimizer step.")] = 1,
    report_to: Annotated[str, typer.Option(
        help="Log to tensorboard, wandb or none.")] = "none",
    logging_dir: Annotated[Path | None, typer.Option(
        help="Where TensorBoard's event files go (default CHECKPOINT_DIR/runs/"
        "<time>_<host>).")] = None,
    save_steps: Annotated[int | None, typer.Option(
        help="Write a checkpoint every N steps (to --checkpoint-dir).")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Where checkpoints go (default OUT/checkpoints).")] = None,
    resume_from_checkpoint: Annotated[str | None, typer.Option(
        help="Continue from 'latest' or a checkpoint-N folder.")] = None,
    skip_memory_check: Annotated[bool, typer.Option(
        "--skip-memory-check", help="Train even when the memory estimate exceeds the "
        "GPU's free memory.")] = False,
    start: Annotated[str, typer.Option(
        help="auto (your latest personalized adapter, else the initial one), init, or an "
        "adapter folder.")] = "auto",
    text_field: TextFieldOption = "text",
    label_field: LabelFieldOption = "label",
    push: Annotated[bool, typer.Option("--push", help="Upload the adapter when done.")
                    ] = False,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Train your LoRA adapter on local data, from the right start; optionally push it.

    Examples:

      fedbip train acme/fed --client alice --data train.jsonl --push

      fedbip train ./myfed --client alice --data data/ --split train --epochs 1
    """
    from fedbip_hub.training.args import TrainingArgs
    from fedbip_hub.training.data_files import load_examples

    args = TrainingArgs(epochs=epochs, learning_rate=lr, batch_size=batch_size,
                        max_length=max_length, seed=seed, device=device, precision=precision,
                        max_steps=max_steps, lr_scheduler=lr_scheduler,
                        warmup_ratio=warmup_ratio, warmup_steps=warmup_steps,
                        max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                        dtype=dtype, quantize=quantize,
                        gradient_checkpointing=gradient_checkpointing, grad_accum=grad_accum,
                        report_to=report_to, save_steps=save_steps,
                        logging_dir=str(logging_dir) if logging_dir else None,
                        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                        resume_from_checkpoint=resume_from_checkpoint,
                        memory_check=not skip_memory_check)
    args.validate()  # before the data, the federation or the model are read
    federation = _fed(fed, token)
    dataset = load_examples(data, split=split)
    check_data(federation, dataset, text_field=text_field, label_field=label_field)
    from fedbip_hub.training.trainer import (
        train_adapter,  # torch and transformers: after the checks
    )

    out = out or Path(f"fedbip-adapter-{client}")
    if not json_output:
        err_console.print(f"Training {client} on {len(dataset)} examples from {data} …")
    result = train_adapter(federation, client, dataset, out, args=args, start=start,
                           text_field=text_field, label_field=label_field, progress=True)
    pushed = None
    if push:
        from fedbip_hub.federation.client import push as push_upload

        pushed = push_upload(federation, client, result.output_dir,
                             n_examples=result.n_examples)
    if json_output:
        payload = {"ok": True, "client": client, **result.to_dict()}
        payload["push"] = None if pushed is None else {
            "repo_id": pushed.repo_id, "commit": pushed.commit,
            "metadata": pushed.metadata.model_dump(mode="json")}
        print_json(payload)
        return
    losses = ""
    if result.start_loss is not None and result.end_loss is not None:
        losses = f", loss {result.start_loss:.4f} → {result.end_loss:.4f}"
    started = (f"personalized revision {result.start_revision[:12]}" if result.start_revision
               else "the federation's initial adapter")
    out_console.print(f"Trained {client} for {result.steps} steps on {result.n_examples} "
                      f"examples in {result.seconds:.1f}s on {result.device} "
                      f"({result.dtype} base, {result.precision}){losses}.")
    out_console.print(f"Started from {started}; adapter saved to {result.output_dir}.")
    if pushed is not None:
        out_console.print(f"Pushed to {pushed.repo_id} @ {pushed.commit[:12]} "
                          f"({pushed.metadata.n_examples} examples).")
    else:
        out_console.print(f"Next: `fedbip push {fed} --client {client} --adapter "
                          f"{result.output_dir}`.")


@handle_errors
def eval_(
    fed: FedArg,
    client: ClientOption,
    data: DataOption,
    split: Annotated[str, typer.Option(help="Split of a saved DatasetDict.")] = "test",
    adapter: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False,
        help="Your own adapter folder (e.g. what `fedbip train` wrote).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per batch.")] = 32,
    max_length: MaxLengthOption = 128,
    device: DeviceOption = "auto",
    text_field: TextFieldOption = "text",
    label_field: LabelFieldOption = "label",
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Score base, own and personalized models on local data; show the personalization gain.

    Examples:

      fedbip eval acme/fed --client alice --data test.jsonl

      fedbip eval ./myfed --client alice --data data/ --adapter fedbip-adapter-alice
    """
    from rich.table import Table

    from fedbip_hub.training.data_files import load_examples

    federation = _fed(fed, token)
    dataset = load_examples(data, split=split)
    check_data(federation, dataset, text_field=text_field, label_field=label_field)
    from fedbip_hub.training.evaluation import evaluate_client  # torch: after the checks

    report = evaluate_client(federation, client, dataset, own_adapter=adapter,
                             device=device, batch_size=batch_size, max_length=max_length,
                             text_field=text_field, label_field=label_field)
    if json_output:
        print_json({"ok": True, **report})
        return
    seq_cls = report["task_type"] == "SEQ_CLS"
    columns = ("accuracy", "loss") if seq_cls else ("perplexity", "loss")
    table = Table(title=f"{client} on {report['n']} examples", title_justify="left")
    for name in ("model", *columns, "note"):
        table.add_column(name, justify="left" if name in ("model", "note") else "right")
    for name in ("base", "own", "personalized"):
        scores = report[name]
        if scores is None:
            table.add_row(name, *("–" for _ in columns), _missing_note(name))
            continue
        note = ("+ initial adapter (head)" if name == "base" and seq_cls else
                f"@ {scores['revision'][:12]}" if name == "personalized" else "")
        table.add_row(name, *(f"{scores[c]:.4f}" for c in columns), note)
    out_console.print(table)
    unit = "accuracy points" if seq_cls else "perplexity reduction"
    for key, label in (("vs_own", "own"), ("vs_base", "base")):
        gain = report["gain"][key]
        if gain is not None:
            style = "green" if gain > 0 else "red" if gain < 0 else ""
            value = f"{gain * 100:+.1f}" if seq_cls else f"{gain:+.4f}"
            out_console.print(f"Personalization gain over {label}: "
                              f"[{style or 'default'}]{value}[/] {unit}")
    for note in report["notes"]:
        err_console.print(f"[dim]Note: {note}[/]")


def check_data(federation, dataset, *, text_field: str, label_field: str) -> None:
    """Columns and labels against the federation's task, before any model loads."""
    from fedbip_hub.training.data import check_examples

    config = federation.config()
    check_examples(dataset, task_type=config.task_type, num_labels=config.num_labels,
                   text_field=text_field, label_field=label_field)


def _missing_note(name: str) -> str:
    return {"own": "pass --adapter DIR", "personalized": "no round yet"}.get(name, "")


def register_training_commands(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(eval_)
