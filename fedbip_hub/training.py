"""Local LoRA training for one member: from the right start adapter to a pushable folder.

``train_adapter`` picks the start (the member's latest personalized adapter, or the
federation's initial one), trains it on local data with a plain PyTorch loop (AdamW,
a constant, linear or cosine learning-rate schedule with optional warmup, gradient-norm
clipping, autocast on GPU), and writes a folder that ``fedbip push`` uploads with
the right metadata: the PEFT adapter, ``fedbip_start.json`` (the start revision) and
``fedbip_upload.json`` (example count, base model).
"""

from __future__ import annotations

import contextlib
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
from fedbip_hub.adapter_config import CONFIG_NAME
from fedbip_hub.client import START_FILE, pull, read_start_revision
from fedbip_hub.data import load_examples, load_tokenizer, needs_tokenizer, prepare_dataset
from fedbip_hub.errors import AdapterError, ConfigError, NotFoundError
from fedbip_hub.evaluation import (
    check_vocab,
    evaluate_prepared,
    fresh_base,
    iter_batches,
    pad_id_of,
    resolve_device,
)
from fedbip_hub.federation import Federation
from fedbip_hub.training_args import (
    DEFAULT_LR_SCHEDULER,
    PRECISIONS,
    SCHEDULER_NAMES,
    TrainingArgs,
)
from fedbip_hub.upload_metadata import UploadMetadata


@dataclass
class TrainResult:
    """What ``train_adapter`` did.

    ``train_loss`` is the mean training loss over the last epoch's steps (dropout on);
    ``start_loss``/``end_loss`` are eval-mode losses on the first ``measure_examples``
    training examples before the first and after the last step (None when not measured).
    ``learning_rates`` holds the rate each optimizer step used.
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

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "n_examples": self.n_examples,
                "start_revision": self.start_revision, "start": self.start,
                "train_loss": self.train_loss, "start_loss": self.start_loss,
                "end_loss": self.end_loss, "steps": self.steps,
                "seconds": round(self.seconds, 3), "device": self.device,
                "precision": self.precision, "lr_scheduler": self.lr_scheduler,
                "warmup_steps": self.warmup_steps}


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


def train_adapter(fed: Federation, client: str, dataset: Any, output_dir: str | Path, *,
                  args: TrainingArgs | None = None, start: str | Path = "auto",
                  tokenizer: Any = None, base_model: Any = None, progress: bool = True,
                  text_field: str = "text", label_field: str = "label") -> TrainResult:
    """Train ``client``'s LoRA adapter on ``dataset`` and save a pushable folder.

    Args:
        fed: the federation (its config gives the base model, task and LoRA).
        client: the member training.
        dataset: a ``datasets.Dataset`` (raw or prepared, see ``fedbip_hub.data``) or a
            path ``load_examples`` reads.
        output_dir: where the adapter folder is written.
        args: hyper-parameters (defaults: ``TrainingArgs()``).
        start: "auto" (the latest personalized adapter, else the initial one), "init", or
            an adapter folder (whose ``fedbip_start.json`` gives the start revision).
        tokenizer: for text data; by default the base model's, loaded only when needed.
        base_model: an already-loaded base model to copy (it is not modified).
        progress: show a progress bar on stderr.

    Raises:
        ConfigError: bad data, options or base model; AdapterError: a bad start adapter;
        NotFoundError: ``client`` is not a member.
    """
    args = args or TrainingArgs()
    args.validate()
    began = time.perf_counter()
    head = fed.head()
    config = fed.config(head)
    member = fed.member(client, head)
    task_type = config.task_type
    if isinstance(dataset, (str, Path)):
        dataset = load_examples(dataset)
    if tokenizer is None and needs_tokenizer(dataset, task_type, text_field=text_field):
        tokenizer = load_tokenizer(config.base_model, revision=config.base_revision)
    prepared = prepare_dataset(dataset, task_type=task_type, tokenizer=tokenizer,
                               max_length=args.max_length, text_field=text_field,
                               label_field=label_field, num_labels=config.num_labels)
    device = resolve_device(args.device)
    amp_dtype, precision = resolve_precision(args.precision, device)

    torch.manual_seed(args.seed)
    base = fresh_base(config, base_model)
    check_vocab(base, prepared)
    with tempfile.TemporaryDirectory(prefix="fedbip-start-") as tmp:
        start_dir, start_revision, start_kind = _start_folder(fed, client, start, Path(tmp))
        model = _load_start(base, start_dir, client)
    if amp_dtype is None:
        model.float()  # no autocast: everything in fp32, whatever the checkpoint's dtype
    else:
        for param in model.parameters():  # trainable weights (LoRA, head) in fp32
            if param.requires_grad:
                param.data = param.data.float()
    model.to(device)
    pad_id = pad_id_of(model)

    measured = (prepared.select(range(min(args.measure_examples, len(prepared))))
                if args.measure_examples > 0 else None)

    def measure() -> float | None:
        if measured is None:
            return None
        scores = evaluate_prepared(model, measured, task_type=task_type,
                                   batch_size=args.batch_size, device=str(device))
        return float(scores["loss"])

    start_loss = measure()
    steps_per_epoch = math.ceil(len(prepared) / args.batch_size)
    total = (args.max_steps if args.max_steps is not None
             else math.ceil(args.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    from transformers import get_scheduler

    warmup = args.warmup_for(total)
    scheduler = get_scheduler(SCHEDULER_NAMES[args.lr_scheduler], optimizer,
                              num_warmup_steps=warmup, num_training_steps=total)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    shuffler = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    rates: list[float] = []

    def batches():
        while True:
            order = torch.randperm(len(prepared), generator=shuffler).tolist()
            yield from iter_batches(prepared, args.batch_size, pad_id=pad_id,
                                    task_type=task_type, order=order)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    bar = _progress_bar(total, f"train {client}", enabled=progress)
    torch.manual_seed(args.seed)  # dropout masks: the same whether the base was given or not
    model.train()
    stream = batches()
    try:
        for _step in range(total):
            batch = {k: v.to(device) for k, v in next(stream).items()}
            with autocast():
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            if args.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            rates.append(float(optimizer.param_groups[0]["lr"]))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    end_loss = measure() if total else start_loss
    last_epoch = losses[-min(len(losses), steps_per_epoch):]
    train_loss = sum(last_epoch) / len(last_epoch) if last_epoch else (start_loss or 0.0)

    out = _save(model, Path(output_dir), config, member.repo_id, start_revision,
                len(prepared))
    return TrainResult(output_dir=out, n_examples=len(prepared),
                       start_revision=start_revision, train_loss=float(train_loss),
                       seconds=time.perf_counter() - began, device=str(device), steps=total,
                       start=start_kind, start_loss=start_loss, end_loss=end_loss,
                       precision=precision, losses=losses, learning_rates=rates,
                       lr_scheduler=args.lr_scheduler, warmup_steps=warmup)


def _progress_bar(total: int, description: str, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _save(model: Any, out: Path, config: Any, repo_id: str,
          start_revision: str | None, n_examples: int) -> Path:
    from fedbip_hub.models import stamp_base_model

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    stamp_base_model(out, config)
    (out / START_FILE).write_text(json.dumps(
        {"start_revision": start_revision, "repo_id": repo_id}) + "\n")
    UploadMetadata(n_examples=n_examples, start_revision=start_revision,
                   base_model=config.base_model, base_revision=config.base_revision,
                   fedbip_version=__version__).write(out)
    return out
