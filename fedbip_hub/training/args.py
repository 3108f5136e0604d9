"""The options of one local training run (no torch import: the CLI reads them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbip_hub.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = PRECISIONS  # the frozen base's dtype: auto is bf16/fp16 on a GPU, fp32 on CPU
QUANTIZE = ("4bit", "8bit")
REPORT_TO = ("none", "tensorboard", "wandb")
LR_SCHEDULERS = ("constant", "linear", "cosine")
# A decay to zero in every round starves the few local steps a federated client takes: on
# a real encoder with 16 examples per client (issue 11) a constant rate reached local 0.851
# against 0.727 for the linear decay. One constant, so a benchmark can change the default.
DEFAULT_LR_SCHEDULER = "constant"
# transformers' schedule names; "constant" is its constant_with_warmup (no warmup: constant).
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class TrainingArgs:
    """Hyper-parameters of one local training run.

    ``precision="auto"``: bf16 autocast on a CUDA GPU that supports it, else fp16 (with
    loss scaling) on CUDA, fp32 on CPU; the base is loaded in fp32 and trainable weights
    stay fp32 under autocast. ``max_steps`` caps the optimizer steps (it wins
    over ``epochs``). ``measure_examples`` training examples are scored in eval mode
    before and after training (``TrainResult.start_loss``/``end_loss``); 0 skips it.

    ``lr_scheduler`` ("constant", "linear" or "cosine", from transformers'
    ``get_scheduler``) shapes the rate after a linear warmup from 0 of ``warmup_steps``
    steps (when set) or ``warmup_ratio`` of the steps; linear and cosine decay to 0 at the
    last step. ``max_grad_norm`` clips the gradients' global norm; None or 0 disables it.

    ``dtype`` is the frozen base's dtype ("auto": bf16, or fp16 without bf16 support, on a
    GPU; fp32 on CPU); trainable weights are fp32 whatever it is. ``quantize`` ("4bit" or
    "8bit") loads the base's linear layers through bitsandbytes instead (QLoRA).
    ``batch_size`` is per device and optimizer step; ``grad_accum`` micro-batches of it
    make one step. ``save_steps`` writes a Trainer checkpoint every so many steps to
    ``checkpoint_dir`` (default: ``checkpoints`` inside the output folder);
    ``resume_from_checkpoint`` ("latest" or a ``checkpoint-N`` folder) continues one.
    ``memory_check`` stops a GPU run whose memory estimate exceeds the free memory.
    ``report_to="tensorboard"`` writes event files (the loss and learning rate of every
    step) to ``logging_dir``, by default ``runs/<time>_<host>`` in the checkpoint folder.
    """

    epochs: float = 3
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    weight_decay: float = 0.0
    max_steps: int | None = None
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    measure_examples: int = 256
    lr_scheduler: str = DEFAULT_LR_SCHEDULER
    warmup_steps: int | None = None
    dtype: str = "auto"
    quantize: str | None = None
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    report_to: str = "none"
    save_steps: int | None = None
    checkpoint_dir: str | None = None
    resume_from_checkpoint: str | None = None
    memory_check: bool = True
    logging_dir: str | None = None

    def validate(self) -> None:
        """Refuse out-of-range options (ConfigError naming the CLI flag), before any load."""
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size (--batch-size) must be ≥ 1, got {self.batch_size}")
        for name, flag, value in (("learning_rate", "--lr", self.learning_rate),
                                  ("epochs", "--epochs", self.epochs),
                                  ("weight_decay", "--weight-decay", self.weight_decay),
                                  ("max_steps", "--max-steps", self.max_steps),
                                  ("warmup_steps", "--warmup-steps", self.warmup_steps),
                                  ("max_grad_norm", "--max-grad-norm", self.max_grad_norm)):
            if value is not None and not value >= 0:  # also refuses NaN
                problems.append(f"{name} ({flag}) must be ≥ 0, got {value}")
        if not 0 <= self.warmup_ratio <= 1:
            problems.append(f"warmup_ratio (--warmup-ratio) must be between 0 and 1, got "
                            f"{self.warmup_ratio}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"unknown lr_scheduler (--lr-scheduler) {self.lr_scheduler!r}; "
                            f"use one of {', '.join(LR_SCHEDULERS)}")
        if self.precision not in PRECISIONS:
            problems.append(f"unknown precision (--precision) {self.precision!r}; use one "
                            f"of {', '.join(PRECISIONS)}")
        if self.grad_accum < 1:
            problems.append(f"grad_accum (--grad-accum) must be ≥ 1, got {self.grad_accum}")
        if self.save_steps is not None and self.save_steps < 1:
            problems.append(f"save_steps (--save-steps) must be ≥ 1, got {self.save_steps}")
        for name, flag, value, allowed in (("dtype", "--dtype", self.dtype, DTYPES),
                                           ("report_to", "--report-to", self.report_to,
                                            REPORT_TO)):
            if value not in allowed:
                problems.append(f"unknown {name} ({flag}) {value!r}; use one of "
                                f"{', '.join(allowed)}")
        if self.logging_dir is not None and self.report_to != "tensorboard":
            problems.append("logging_dir (--logging-dir) is where TensorBoard writes; use "
                            "it with --report-to tensorboard")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            problems.append(f"unknown quantize (--quantize) {self.quantize!r}; use "
                            f"{' or '.join(QUANTIZE)}")
        if problems:
            raise ConfigError("invalid training options: " + "; ".join(problems) + ".",
                              hint="Fix the options named above.")

    def warmup_for(self, total: int) -> int:
        """Warmup steps of a ``total``-step run: ``warmup_steps`` wins over the ratio."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(self.warmup_ratio * total)
