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
from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.metadata import UploadMetadata
from fedbip_hub.errors import AdapterError, ConfigError, NotFoundError
from fedbip_hub.federation.client import START_FILE, pull, read_start_revision
from fedbip_hub.federation.repo import Federation
from fedbip_hub.training.args import DEFAULT_LR_SCHEDULER, DTYPES, PRECISIONS, TrainingArgs
from fedbip_hub.training.data import load_examples, load_tokenizer, needs_tokenizer, prepare_dataset
from fedbip_hub.training.evaluation import check_vocab, evaluate_prepared, pad_id_of, resolve_device
from fedbip_hub.training.memory_estimate import MemoryEstimate, ModelShape, estimate, fix_for, gib


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


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None: fp32) and its name, for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}.",
                          hint=f"Use one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        if device.type != "cuda":
            return None, "fp32"
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, "fp32"
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("fp16 autocast needs a GPU.", hint="Use --precision fp32 or bf16.")
    return (torch.bfloat16 if precision == "bf16" else torch.float16), precision


def _start_folder(fed: Federation, client: str, start: str | Path, tmp: Path
                  ) -> tuple[Path, str | None, str]:
    """(folder, start revision, description) of the adapter training starts from."""
    if str(start) == "init":
        return fed.init_folder(), None, "init"
    if str(start) == "auto":
        try:
            pulled = pull(fed, client, tmp / "start")
        except NotFoundError:
            return fed.init_folder(), None, "init"
        return pulled.folder, pulled.revision, "personalized"
    folder = Path(start)
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(f"{folder} is not an adapter folder (no {CONFIG_NAME}).",
                           hint="Pass --start auto, init, or a folder `fedbip pull` wrote.",
                           client=client)
    return folder, read_start_revision(folder), str(folder)


def _load_start(base: Any, folder: Path, client: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterError(f"cannot load the start adapter {folder}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                           hint="Check that it belongs to this federation's base model.",
                           client=client) from exc


def resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The frozen base's dtype and its name, for ``dtype`` on ``device``."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}.", hint=f"Use one of {', '.join(DTYPES)}.")
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32, "fp32"
        dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and dtype == "fp16":
        raise ConfigError("an fp16 base needs a GPU.", hint="Use --dtype fp32 or bf16.")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype], dtype


@dataclass(frozen=True)
class _Numerics:
    base_dtype: torch.dtype       # the frozen base's weights (what bitsandbytes leaves)
    dtype: str
    autocast: torch.dtype | None  # mixed precision; None: none
    precision: str

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast or torch.float32


def _numerics(args: TrainingArgs, device: torch.device) -> _Numerics:
    """The base dtype and the autocast dtype; a half-precision base needs autocast (the
    fp32 head and LoRA meet its half activations), so "auto" follows the base."""
    base_dtype, dtype = resolve_dtype(args.dtype, device)
    precision = args.precision
    if precision == "auto" and base_dtype != torch.float32 and not args.quantize:
        precision = dtype
    autocast, precision = resolve_precision(precision, device)
    if autocast is None and base_dtype != torch.float32 and not args.quantize:
        raise ConfigError(f"a {dtype} base needs {dtype} mixed precision, not fp32.",
                          hint=f"Use --precision auto or {dtype}, or --dtype fp32.")
    return _Numerics(base_dtype, dtype, autocast, precision)


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


def load_frozen_base(config: Any, base_model: Any, args: TrainingArgs, numerics: _Numerics,
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


def _memory_estimate(config: Any, base_model: Any, start_dir: Path, args: TrainingArgs,
                     numerics: _Numerics, seq_len: int, *, token: str | None = None
                     ) -> MemoryEstimate | None:
    """The run's memory estimate from the base's config (no weights); None where the
    architecture cannot be built on the meta device."""
    from peft import LoraConfig
    from transformers import AutoConfig

    try:
        hf_config = (copy.deepcopy(base_model.config) if base_model is not None else
                     AutoConfig.from_pretrained(config.base_model,
                                                revision=config.base_revision,
                                                token=token))
        lora_config = LoraConfig.from_pretrained(str(start_dir))
        # A saved adapter's config says inference_mode=True (PEFT sets it on save): it
        # would freeze the LoRA factors and count no trainable bytes. This run trains them.
        lora_config.inference_mode = False
        shape = ModelShape.from_config(hf_config, task_type=config.task_type,
                                       num_labels=config.num_labels, lora_config=lora_config)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError):
        return None
    activation = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(numerics.autocast,
                                                                      numerics.dtype)
    return estimate(shape, dtype=numerics.dtype, quantize=args.quantize,
                    batch_size=args.batch_size, seq_len=seq_len,
                    gradient_checkpointing=args.gradient_checkpointing,
                    activation_dtype=activation)


def _check_fits(est: MemoryEstimate | None, device: torch.device, client: str) -> None:
    """Stop before loading when the estimate exceeds the GPU's free memory."""
    if est is None or device.type != "cuda":
        return
    free, _total = torch.cuda.mem_get_info(device)
    if est.total > free:
        raise ConfigError(f"training needs about {gib(est.total)} but {device} has "
                          f"{gib(free)} free ({'; '.join(est.lines()[:-1])}).",
                          hint=fix_for(est) + " (--skip-memory-check runs anyway.)",
                          client=client)


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


def _cast_trainable(model: Any, numerics: _Numerics, quantized: bool) -> None:
    """Trainable weights (LoRA, head) in fp32; the frozen rest stays at the base's dtype."""
    if not quantized and numerics.base_dtype == torch.float32:
        model.float()  # whatever the checkpoint's dtype
        return
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def _resume_target(args: TrainingArgs, checkpoints: Path, start_revision: str | None,
                   client: str) -> str | bool | None:
    """What to pass the Trainer's ``resume_from_checkpoint``, after checking that the
    checkpoints continue a run from the same start adapter."""
    if not args.resume_from_checkpoint:
        return None
    target = args.resume_from_checkpoint
    folder = checkpoints if target == "latest" else Path(target)
    if target != "latest" and not folder.is_dir():
        raise ConfigError(f"no checkpoint at {folder}.",
                          hint="Pass --resume-from-checkpoint latest, or a checkpoint-N "
                          "folder a run with --save-steps wrote.", client=client)
    if target == "latest" and not any(checkpoints.glob("checkpoint-*")):
        raise ConfigError(f"no checkpoint in {checkpoints} to resume from.",
                          hint="Train with --save-steps N first (and the same --out or "
                          "--checkpoint-dir).", client=client)
    noted = (folder if target == "latest" else folder.parent) / START_FILE
    if noted.is_file():
        recorded = json.loads(noted.read_text()).get("start_revision")
        if recorded != start_revision:
            raise ConfigError(
                f"the checkpoints continue a run that started from "
                f"{recorded or 'the initial adapter'}, but this run starts from "
                f"{start_revision or 'the initial adapter'}.",
                hint="Pass --start with the run's original start, or train afresh without "
                "--resume-from-checkpoint.", client=client)
    return True if target == "latest" else str(folder)


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
    numerics = _numerics(args, device)
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
        start_dir, start_revision, start_kind = _start_folder(fed, client, start, Path(tmp))
        resume = _resume_target(args, checkpoints, start_revision, client)
        est = _memory_estimate(config, base_model, start_dir, args, numerics, seq_len,
                               token=fed.token)
        if progress and est is not None:
            print("Memory estimate: " + "; ".join(est.lines()), file=sys.stderr)
        if args.memory_check:
            _check_fits(est, device, client)
        torch.manual_seed(args.seed)
        base = load_frozen_base(config, base_model, args, numerics, device, token=fed.token)
        check_vocab(base, prepared)
        model = _load_start(base, start_dir, client)
    _cast_trainable(model, numerics, bool(args.quantize))

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
