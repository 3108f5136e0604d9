"""The pieces ``train_adapter`` hands to transformers' Trainer: its arguments, the batch
collator, the loss per task, and callbacks that record each step and show progress.

The Trainer owns the loop: device placement (and multi-GPU through accelerate),
mixed precision, gradient accumulation and checkpointing, clipping, the schedule,
checkpoints and resume, and logging integrations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from fedbip_hub.training.args import SCHEDULER_NAMES, TrainingArgs
from fedbip_hub.training.evaluation import collate


class Collator:
    """Right-pads a list of prepared rows into one batch (``evaluation.collate``)."""

    def __init__(self, pad_id: int, task_type: str):
        self.pad_id, self.task_type = pad_id, task_type

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        columns = {"input_ids": [r["input_ids"] for r in rows],
                   "labels": [r["labels"] for r in rows]}
        return collate(columns, pad_id=self.pad_id, task_type=self.task_type)


class FedbipTrainer(Trainer):
    """A Trainer whose loss is right under gradient accumulation for both tasks.

    SEQ_CLS: the mean over a micro-batch's examples, which the Trainer divides by the
    accumulation steps (equal micro-batches: the mean over the whole step). CAUSAL_LM:
    the sum over predicted tokens divided by the step's token count (``num_items_in_batch``),
    so a step is token-weighted exactly as one big batch would be.
    """

    def __init__(self, *args: Any, task_type: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.task_type = task_type
        self.loss_is_scaled_for_ga = task_type == "CAUSAL_LM"
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            self.accelerator.free_memory = self._fresh_free_memory

    def _fresh_free_memory(self, *objects: Any) -> list:
        """``Accelerator.free_memory`` without its ``gc.collect()``: train() calls it first
        to drop an earlier run's objects, but this accelerator is new and holds none, and
        a full collection costs up to a second per run in a process with many live
        objects (a federation's clients training round after round)."""
        accelerator = self.accelerator
        accelerator._schedulers, accelerator._optimizers = [], []
        accelerator._models, accelerator._dataloaders = [], []
        accelerator.step = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [None] * len(objects)

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.task_type == "CAUSAL_LM" and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class StepRecorder(TrainerCallback):
    """The learning rate each optimizer step used and each step's training loss."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.losses: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rates.append(float(kwargs["optimizer"].param_groups[0]["lr"]))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class QuietLogProgress(ProgressCallback):
    """The Trainer's own progress bar (on stderr), with the loss in the bar instead of a
    log line per step on stdout (which would break ``--json`` output)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs \
                and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


def trainer_arguments(args: TrainingArgs, *, output_dir: Path, total_steps: int,
                      warmup: int, autocast: torch.dtype | None, use_cpu: bool,
                      progress: bool) -> Any:
    """transformers' TrainingArguments for ``args`` (a run of ``total_steps`` steps)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, max_steps=total_steps,
        lr_scheduler_type=SCHEDULER_NAMES[args.lr_scheduler], warmup_steps=warmup,
        max_grad_norm=args.max_grad_norm or 0.0, optim="adamw_torch", seed=args.seed,
        bf16=autocast == torch.bfloat16, fp16=autocast == torch.float16, use_cpu=use_cpu,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_strategy="steps", logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=[] if args.report_to == "none" else [args.report_to],
        disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_pin_memory=not use_cpu, dataloader_num_workers=0)


def build_trainer(model: Any, dataset: Any, targs: Any, *, pad_id: int, task_type: str,
                  progress: bool, logging_dir: str | Path | None = None
                  ) -> tuple[FedbipTrainer, StepRecorder]:
    recorder = StepRecorder()
    trainer = FedbipTrainer(model=model, args=targs, train_dataset=dataset,
                            data_collator=Collator(pad_id, task_type), callbacks=[recorder],
                            task_type=task_type)
    trainer.remove_callback(PrinterCallback)  # prints every log line on stdout
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(QuietLogProgress)
    if logging_dir is not None:
        _point_tensorboard(trainer, Path(logging_dir))
    return trainer, recorder


def _point_tensorboard(trainer: Trainer, logging_dir: Path) -> None:
    """Send TensorBoard's event files to ``logging_dir``. transformers ≥ 5 has no
    ``TrainingArguments.logging_dir``: its callback reads the folder from
    TENSORBOARD_LOGGING_DIR when built, else uses ``output_dir/runs/<time>_<host>`` at
    the start of training; setting it on this run's callback touches no environment."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(logging_dir)
