"""Local LoRA training for one member: from the right start adapter to a pushable folder.

``train_adapter`` picks the start (the member's latest personalized adapter, or the
federation's initial one), trains it on local data with transformers' Trainer (AdamW,
a constant, linear or cosine learning-rate schedule with optional warmup, gradient-norm
clipping, mixed precision, gradient accumulation and checkpointing, a bitsandbytes-quantized
base, checkpoints and resume, TensorBoard/W&B logging, several GPUs through accelerate),
after printing a memory estimate (``fedbip_hub.training.memory_estimate``), and writes a folder
that ``fedbip push`` uploads with the right metadata: the PEFT adapter,
``fedbip_start.json`` (the start revision) and ``fedbip_upload.json`` (example count,
base model).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedbip_hub import __version__
from fedbip_hub.adapters.metadata import UploadMetadata
from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.client import START_FILE
from fedbip_hub.federation.repo import Federation
from fedbip_hub.training.args import DEFAULT_LR_SCHEDULER, TrainingArgs
from fedbip_hub.training.data import load_tokenizer, needs_tokenizer, prepare_dataset
from fedbip_hub.training.data_files import load_examples
from fedbip_hub.training.evaluation import check_vocab, evaluate_prepared, pad_id_of, resolve_device
from fedbip_hub.training.memory_check import check_fits, estimate_run
from fedbip_hub.training.numerics import Numerics, cast_trainable, resolve_numerics
from fedbip_hub.training.start import load_start, resume_target, start_folder


@dataclass
class TrainResult:
    """What ``train_adapter`` did.

    ``train_loss`` is the mean training loss over the last epoch's steps (dropout on);
    ``start_loss``/``end_loss`` are eval-mode losses on the first ``measure_examples``
    training examples before the first and after the last step (None when not measured).
    ``learning_rates`` holds the rate each optimizer step used and ``losses`` each step's
    training loss (the mean over its micro-batches). ``dtype`` is the frozen base's
    dtype, or "4bit"/"8bit" when quantized.
    """

    output_dir: Path
    n_examples: int
    start_revision: str | None
    train_loss: float
    seconds: float
    device: str
    steps: int = 0
    start: str = "init"
    start_loss: float | None = None
    end_loss: float | None = None
    precision: str = "fp32"
    losses: list[float] = field(default_factory=list, repr=False)
    learning_rates: list[float] = field(default_factory=list, repr=False)
    lr_scheduler: str = DEFAULT_LR_SCHEDULER
    warmup_steps: int = 0
    dtype: str = "fp32"
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    memory_estimate: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "n_examples": self.n_examples,
                "start_revision": self.start_revision, "start": self.start,
                "train_loss": self.train_loss, "start_loss": self.start_loss,
                "end_loss": self.end_loss, "steps": self.steps,
                "seconds": round(self.seconds, 3), "device": self.device,
                "precision": self.precision, "lr_scheduler": self.lr_scheduler,
                "warmup_steps": self.warmup_steps, "dtype": self.dtype,
                "grad_accum": self.grad_accum,
                "gradient_checkpointing": self.gradient_checkpointing,
                "memory_estimate": self.memory_estimate}


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and device.index not in (None, 0):
        raise ConfigError(f"--device {device} is not supported by the trainer.",
                          hint=f"Pick the GPU with CUDA_VISIBLE_DEVICES={device.index} and "
                          "--device cuda (or launch on several GPUs with accelerate).")


def _check_report_to(report_to: str) -> None:
    if report_to == "none":
        return
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
    try:
        __import__(module)
    except ImportError as exc:
        raise ConfigError(f"--report-to {report_to} needs the {module} package.",
                          hint=f"pip install {module}, or use --report-to none.") from exc


def load_frozen_base(config: Any, base_model: Any, args: TrainingArgs, numerics: Numerics,
                     device: torch.device, *, token: str | None = None) -> Any:
    """The base to train LoRA on: a copy of ``base_model`` (left untouched) or the
    federation's, at the run's dtype or quantized."""
    if args.quantize:
        from fedbip_hub.training.quantization import load_quantized_base

        return load_quantized_base(config, args.quantize, compute_dtype=numerics.compute_dtype,
                                   device=device,
                                   gradient_checkpointing=args.gradient_checkpointing,
                                   token=token)
    if base_model is not None:
        return copy.deepcopy(base_model).to(numerics.base_dtype)
    from fedbip_hub.training.models import load_base_model

    return load_base_model(config, dtype=numerics.base_dtype, token=token)


def _measure(model: Any, data: Any, task_type: str, batch_size: int,
             autocast: torch.dtype | None) -> float | None:
    """Eval-mode loss on ``data`` where the model is (None without data)."""
    if data is None:
        return None
    device = next(model.parameters()).device
    context = (torch.autocast(device.type, dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
    with context:
        scores = evaluate_prepared(model, data, task_type=task_type, batch_size=batch_size,
                                   device=str(device))
    return float(scores["loss"])


def train_adapter(fed: Federation, client: str, dataset: Any, output_dir: str | Path, *,
                  args: TrainingArgs | None = None, start: str | Path = "auto",
                  tokenizer: Any = None, base_model: Any = None, progress: bool = True,
                  text_field: str = "text", label_field: str = "label") -> TrainResult:
    """Train ``client``'s LoRA adapter on ``dataset`` with transformers' Trainer and save a
    pushable folder.

    Args:
        fed: the federation (its config gives the base model, task and LoRA).
        client: the member training.
        dataset: a ``datasets.Dataset`` (raw or prepared, see ``fedbip_hub.training.data``) or a
            path ``load_examples`` reads.
        output_dir: where the adapter folder is written.
        args: hyper-parameters (defaults: ``TrainingArgs()``).
        start: "auto" (the latest personalized adapter, else the initial one), "init", or
            an adapter folder (whose ``fedbip_start.json`` gives the start revision).
        tokenizer: for text data; by default the base model's, loaded only when needed.
        base_model: an already-loaded base model to copy (it is not modified).
        progress: show the memory estimate and the Trainer's progress bar on stderr.

    Raises:
        ConfigError: bad data, options or base model, or a run that cannot fit the GPU;
        AdapterError: a bad start adapter; NotFoundError: ``client`` is not a member.
    """
    args = args or TrainingArgs()
    args.validate()
    began = time.perf_counter()
    head = fed.head()
    config = fed.config(head)
    member = fed.member(client, head)
    task_type = config.task_type
    device = resolve_device(args.device)
    _check_device(device)
    numerics = resolve_numerics(args, device)
    _check_report_to(args.report_to)
    if args.quantize:
        from fedbip_hub.training.quantization import require_bitsandbytes

        require_bitsandbytes(args.quantize)
        if base_model is not None:
            raise ConfigError("a quantized run loads the base itself; it cannot copy a "
                              "given base_model.", hint="Drop base_model or --quantize.",
                              client=client)
    if isinstance(dataset, (str, Path)):
        dataset = load_examples(dataset)
    if tokenizer is None and needs_tokenizer(dataset, task_type, text_field=text_field):
        tokenizer = load_tokenizer(config.base_model, revision=config.base_revision,
                                   token=fed.token)
    prepared = prepare_dataset(dataset, task_type=task_type, tokenizer=tokenizer,
                               max_length=args.max_length, text_field=text_field,
                               label_field=label_field, num_labels=config.num_labels)
    seq_len = max(len(row) for row in prepared["input_ids"])
    out = Path(output_dir)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"

    with tempfile.TemporaryDirectory(prefix="fedbip-start-") as tmp:
        start_dir, start_revision, start_kind = start_folder(fed, client, start, Path(tmp))
        resume = resume_target(args, checkpoints, start_revision, client)
        est = estimate_run(config, base_model, start_dir, args, numerics, seq_len,
                           token=fed.token)
        if progress and est is not None:
            print("Memory estimate: " + "; ".join(est.lines()), file=sys.stderr)
        if args.memory_check:
            check_fits(est, device, client)
        torch.manual_seed(args.seed)
        base = load_frozen_base(config, base_model, args, numerics, device, token=fed.token)
        check_vocab(base, prepared)
        model = load_start(base, start_dir, client)
    cast_trainable(model, numerics, bool(args.quantize))

    steps_per_epoch = math.ceil(math.ceil(len(prepared) / args.batch_size) / args.grad_accum)
    total = (args.max_steps if args.max_steps is not None
             else math.ceil(args.epochs * steps_per_epoch))
    warmup = args.warmup_for(total)
    from fedbip_hub.training.hf_trainer import build_trainer, trainer_arguments

    targs = trainer_arguments(args, output_dir=checkpoints, total_steps=max(total, 1),
                              warmup=warmup, autocast=numerics.autocast,
                              use_cpu=device.type == "cpu", progress=progress)
    trainer, recorder = build_trainer(model, prepared, targs, pad_id=pad_id_of(model),
                                      task_type=task_type, progress=progress,
                                      logging_dir=args.logging_dir)
    model = trainer.model  # placed on the Trainer's device
    measured = (prepared.select(range(min(args.measure_examples, len(prepared))))
                if args.measure_examples > 0 else None)
    start_loss = _measure(model, measured, task_type, args.batch_size, numerics.autocast)
    if total > 0:
        if args.save_steps and trainer.is_world_process_zero():
            checkpoints.mkdir(parents=True, exist_ok=True)
            (checkpoints / START_FILE).write_text(json.dumps(
                {"start_revision": start_revision, "repo_id": member.repo_id}) + "\n")
        torch.manual_seed(args.seed)  # dropout masks: the same whether the base was given
        try:
            trainer.train(resume_from_checkpoint=resume)
        except ValueError as exc:
            if "checkpoint" not in str(exc).lower():
                raise
            raise ConfigError(f"cannot resume: {str(exc).splitlines()[0]}",
                              hint="Check --resume-from-checkpoint and --checkpoint-dir.",
                              client=client) from exc
        if args.gradient_checkpointing:
            model.gradient_checkpointing_disable()
    end_loss = (_measure(model, measured, task_type, args.batch_size, numerics.autocast)
                if total else start_loss)
    losses = recorder.losses
    last_epoch = losses[-min(len(losses), steps_per_epoch):]
    train_loss = sum(last_epoch) / len(last_epoch) if last_epoch else (start_loss or 0.0)
    if trainer.is_world_process_zero():
        _save(model, out, config, member.repo_id, start_revision, len(prepared))
    return TrainResult(output_dir=out, n_examples=len(prepared),
                       start_revision=start_revision, train_loss=float(train_loss),
                       seconds=time.perf_counter() - began, device=str(device), steps=total,
                       start=start_kind, start_loss=start_loss, end_loss=end_loss,
                       precision=numerics.precision, losses=losses,
                       learning_rates=recorder.rates, lr_scheduler=args.lr_scheduler,
                       warmup_steps=warmup, dtype=args.quantize or numerics.dtype,
                       grad_accum=args.grad_accum,
                       gradient_checkpointing=args.gradient_checkpointing,
                       memory_estimate=est.to_dict() if est is not None else None)


def _save(model: Any, out: Path, config: Any, repo_id: str,
          start_revision: str | None, n_examples: int) -> Path:
    from fedbip_hub.training.models import stamp_base_model

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    stamp_base_model(out, config)
    (out / START_FILE).write_text(json.dumps(
        {"start_revision": start_revision, "repo_id": repo_id}) + "\n")
    UploadMetadata(n_examples=n_examples, start_revision=start_revision,
                   base_model=config.base_model, base_revision=config.base_revision,
                   fedbip_version=__version__).write(out)
    return out
