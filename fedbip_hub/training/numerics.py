"""The numbers a training run computes in: the frozen base's dtype, mixed precision, and
the fp32 trainable weights, decided from the options and the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedbip_hub.errors import ConfigError
from fedbip_hub.training.args import DTYPES, PRECISIONS, TrainingArgs


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
class Numerics:
    base_dtype: torch.dtype       # the frozen base's weights (what bitsandbytes leaves)
    dtype: str
    autocast: torch.dtype | None  # mixed precision; None: none
    precision: str

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast or torch.float32


def resolve_numerics(args: TrainingArgs, device: torch.device) -> Numerics:
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
    return Numerics(base_dtype, dtype, autocast, precision)


def cast_trainable(model: Any, numerics: Numerics, quantized: bool) -> None:
    """Trainable weights (LoRA, head) in fp32; the frozen rest stays at the base's dtype."""
    if not quantized and numerics.base_dtype == torch.float32:
        model.float()  # whatever the checkpoint's dtype
        return
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
