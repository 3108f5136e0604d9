"""Task vectors τ = ΔW(upload) − ΔW(start), kept factored, read module by module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.errors import IncompatibleAdaptersError

Space = Literal["delta", "params"]


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = u·v with u d_out×R and v R×d_in."""

    u: torch.Tensor
    v: torch.Tensor

    def materialize(self) -> torch.Tensor:
        return self.u @ self.v


@dataclass(frozen=True)
class ParamsDelta:
    """The paper-literal (A, s·B) parameter delta, for the "params" space (FedIT-like)."""

    a: torch.Tensor
    b: torch.Tensor

    def flat(self) -> torch.Tensor:
        return torch.cat([self.a.reshape(-1), self.b.reshape(-1)])


@dataclass(frozen=True)
class DenseDelta:
    """A full-tensor delta, for modules_to_save (heads)."""

    value: torch.Tensor


ModuleDelta = LowRankDelta | ParamsDelta | DenseDelta


class TaskVector:
    """One client's task vector: its upload minus the adapter it started from.

    Args:
        upload: the adapter the client trained and pushed.
        start: the adapter it started from (the federation's initial adapter or a
            personalized one); ``None`` means zero (a fresh start, as in ``fedbip merge``).
        name: the client, for messages.
        dtype: the compute dtype.
    """

    def __init__(self, upload: LoraAdapter, start: LoraAdapter | None = None, *,
                 name: str | None = None, dtype: torch.dtype = torch.float32):
        self.upload = upload
        self.start = start
        self.name = name or upload.label or str(upload.folder)
        self.dtype = dtype
        if start is not None:
            _check_same_layout(self.name, upload, start, "its start adapter")

    @property
    def lora_modules(self) -> list[str]:
        return list(self.upload.modules)

    @property
    def dense_params(self) -> list[str]:
        return list(self.upload.dense)

    def shape_of(self, module: str) -> tuple[int, int]:
        info = self.upload.modules[module]
        return info.out_features, info.in_features

    def lowrank(self, module: str) -> LowRankDelta:
        """τ for one LoRA module as stacked factors [s·B_up, −s_S·B_S]·[A_up; A_S]."""
        u, v = self.upload.delta_factors(module, self.dtype)
        if self.start is not None:
            u_s, v_s = self.start.delta_factors(module, self.dtype)
            if torch.count_nonzero(u_s) > 0:  # the LoRA init has B = 0: nothing to subtract
                u, v = torch.cat([u, -u_s], dim=1), torch.cat([v, v_s], dim=0)
        return LowRankDelta(u, v)

    def params(self, module: str) -> ParamsDelta:
        """τ in (A, s·B) parameter space; needs equal ranks on both sides."""
        b, a = self.upload.lora_factors(module, self.dtype)
        b = b * self.upload.modules[module].scale
        if self.start is not None:
            b_s, a_s = self.start.lora_factors(module, self.dtype)
            if a_s.shape != a.shape:
                raise IncompatibleAdaptersError(
                    f"{module}: rank {a.shape[0]} differs from its start adapter's "
                    f"{a_s.shape[0]}; the params space needs equal ranks.",
                    hint="Use the default delta space, which federates any ranks.",
                    client=self.name,
                )
            a, b = a - a_s, b - b_s * self.start.modules[module].scale
        return ParamsDelta(a, b)

    def dense(self, name: str) -> DenseDelta:
        value = self.upload.dense_tensor(name, self.dtype)
        if self.start is not None and name in self.start.dense:
            value = value - self.start.dense_tensor(name, self.dtype)
        return DenseDelta(value)

    def delta(self, module: str, space: Space = "delta") -> ModuleDelta:
        if module in self.upload.dense:
            return self.dense(module)
        return self.params(module) if space == "params" else self.lowrank(module)


def _check_same_layout(name: str, a: LoraAdapter, b: LoraAdapter, what: str) -> None:
    if set(a.modules) != set(b.modules):
        only_a = sorted(set(a.modules) - set(b.modules))[:3]
        only_b = sorted(set(b.modules) - set(a.modules))[:3]
        raise IncompatibleAdaptersError(
            f"target modules differ from {what}: only in {a.folder}: {only_a}, "
            f"only in {b.folder}: {only_b}.",
            hint="Train every adapter with the federation's target_modules.",
            client=name,
        )
    for module, info in a.modules.items():
        other = b.modules[module]
        if (info.out_features, info.in_features) != (other.out_features, other.in_features):
            raise IncompatibleAdaptersError(
                f"module {module} is {info.out_features}×{info.in_features} but "
                f"{other.out_features}×{other.in_features} in {what}.",
                hint="The adapters were trained on different base models; use the "
                "federation's base model.",
                client=name,
            )


def check_compatible(vectors: list[TaskVector]) -> None:
    """All task vectors must cover the same modules with the same shapes.

    Raises:
        IncompatibleAdaptersError: naming the first client that differs from the first.
    """
    if not vectors:
        return
    first = vectors[0]
    for other in vectors[1:]:
        _check_same_layout(other.name, other.upload, first.upload, f"client {first.name}")
        if set(other.upload.dense) != set(first.upload.dense):
            raise IncompatibleAdaptersError(
                f"saved dense modules {sorted(other.upload.dense)} differ from "
                f"{first.name}'s {sorted(first.upload.dense)}.",
                hint="Use the federation's modules_to_save for every client.",
                client=other.name,
            )


def check_params_ranks(module: str, deltas: list[ModuleDelta], names: list[str]) -> None:
    """The params space adds A and B across clients, so their ranks must agree.

    Raises:
        IncompatibleAdaptersError: naming the first client whose rank differs.
    """
    params = [(d, n) for d, n in zip(deltas, names, strict=True) if isinstance(d, ParamsDelta)]
    if not params:
        return
    first, first_name = params[0]
    for delta, name in params[1:]:
        if delta.a.shape != first.a.shape or delta.b.shape != first.b.shape:
            raise IncompatibleAdaptersError(
                f"{module}: rank {delta.a.shape[0]} differs from {first_name}'s "
                f"{first.a.shape[0]}; the params space needs equal ranks.",
                hint="Use the default delta space (e.g. --strategy fedavg instead of fedit), "
                "which federates any ranks.",
                client=name,
            )
