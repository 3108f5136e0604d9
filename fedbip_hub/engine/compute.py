"""Where and in which precision the engine's maths runs: ``--device``, the compute dtype.

Factors are read on the CPU (safetensors), moved to the compute device for the Gram,
QR, SVD and sketch maths, and every result comes back to the CPU. The compute dtype
only ever *upcasts*: bf16/fp16 inputs are computed in fp32 (the default), and fp64 is
there for exactness checks; an input already wider than the compute dtype keeps its
precision.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedbip_hub.engine.task_vectors import DenseDelta, LowRankDelta, ModuleDelta, ParamsDelta
from fedbip_hub.errors import ConfigError

DeviceName = Literal["cpu", "cuda", "auto"]
ComputeDtype = Literal["fp32", "fp64"]
COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp64": torch.float64}
CPU = torch.device("cpu")


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (cuda when available, else cpu).

    Raises:
        ConfigError: an unknown name, or cuda asked for where no CUDA GPU is available.
    """
    if device is None:
        return CPU
    if isinstance(device, torch.device):
        return device
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if name == "cpu":
        return CPU
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for, but no CUDA GPU is available.",
                              hint="Use --device auto (CUDA when present, else CPU) or cpu.")
        return torch.device(name)
    raise ConfigError(f"unknown device {device!r}.", hint="Use cpu, cuda or auto.")


def resolve_dtype(dtype: str | torch.dtype | None = "fp32") -> torch.dtype:
    """The compute dtype from ``fp32``/``fp64`` (or a torch dtype)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute dtype {dtype!r}.",
                          hint=f"Use one of {', '.join(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[dtype]


def to_compute(tensor: torch.Tensor, device: torch.device | None,
               dtype: torch.dtype | None) -> torch.Tensor:
    """Move to the device, upcasting to ``dtype`` (never narrowing a wider input)."""
    target = tensor.dtype if dtype is None else torch.promote_types(tensor.dtype, dtype)
    return tensor.to(device=device or tensor.device, dtype=target)


def delta_to(delta: ModuleDelta, device: torch.device | None, dtype: torch.dtype | None
             ) -> ModuleDelta:
    """A module delta on the compute device, in the compute dtype (a no-op when it is)."""
    if device is None and dtype is None:
        return delta
    if isinstance(delta, LowRankDelta):
        return LowRankDelta(to_compute(delta.u, device, dtype),
                            to_compute(delta.v, device, dtype))
    if isinstance(delta, ParamsDelta):
        return ParamsDelta(to_compute(delta.a, device, dtype), to_compute(delta.b, device, dtype))
    return DenseDelta(to_compute(delta.value, device, dtype))
