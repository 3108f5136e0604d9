"""Personalized merges: ΔW̄ᵢ ← ΔW̄ᵢ + Σₖ wᵢₖ·τₖ, re-factorised to a LoRA adapter."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fedbip_hub.adapter_config import LoraAdapterConfig
from fedbip_hub.adapter_io import LoraAdapter, save_lora_adapter
from fedbip_hub.lowrank import refactorize
from fedbip_hub.strategies import WeightTable
from fedbip_hub.task_vectors import (
    DenseDelta,
    LowRankDelta,
    ParamsDelta,
    Space,
    TaskVector,
    check_params_ranks,
)

Refactor = Literal["svd", "cat"]


@dataclass
class MergedAdapter:
    """One client's personalized adapter in factored form, ready to save."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    discarded_energy: dict[str, float] = field(default_factory=dict)
    space: Space = "delta"

    @property
    def max_discarded_energy(self) -> float:
        return max(self.discarded_energy.values(), default=0.0)

    def save(self, folder: str | Path, template: LoraAdapterConfig) -> Path:
        """Write as a PEFT adapter (A kept as merged in the params space)."""
        return save_lora_adapter(folder, self.modules, template, dense=self.dense,
                                 fold_scale="b" if self.space == "params" else "balanced")

    def delta_weight(self, module: str) -> torch.Tensor:
        u, v = self.modules[module]
        return u.double() @ v.double()


@dataclass(frozen=True)
class MergePlan:
    """Who merges what.

    Attributes:
        targets: indices of the clients that get a new personalized adapter.
        contribution: per peer k, the factor σ(aₖ) its update enters with; 0 for a peer
            with no new update this round (its cosine still shapes the weights).
        latest: per target, its personalized adapter before the merge (None means zero).
    """

    targets: Sequence[int]
    contribution: torch.Tensor
    latest: Sequence[LoraAdapter | None]


def _coefficients(weights: WeightTable, module: str, target: int, plan: MergePlan
                  ) -> torch.Tensor:
    return weights.for_module(module)[target].to(torch.float64) * plan.contribution


def _merge_lowrank(base: tuple[torch.Tensor, torch.Tensor] | None,
                   deltas: Sequence[LowRankDelta], coeffs: torch.Tensor,
                   rank: int | None, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    us, vs = [], []
    if base is not None and torch.count_nonzero(base[0]) > 0:
        us.append(base[0].to(dtype))
        vs.append(base[1].to(dtype))
    for coeff, delta in zip(coeffs.tolist(), deltas, strict=True):
        if coeff != 0.0:
            us.append(delta.u * coeff)
            vs.append(delta.v)
    if not us:  # nothing to add and a zero start: a zero adapter of the requested rank
        first = deltas[0]
        r = rank or 1
        return (first.u.new_zeros(first.u.shape[0], r), first.v.new_zeros(r, first.v.shape[1]),
                0.0)
    result = refactorize(torch.cat(us, dim=1), torch.cat(vs, dim=0), rank)
    return result.u, result.v, result.discarded_energy


def _merge_params(base: tuple[torch.Tensor, torch.Tensor] | None,
                  deltas: Sequence[ParamsDelta], coeffs: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    b = base[0].clone() if base is not None else torch.zeros_like(deltas[0].b)
    a = base[1].clone() if base is not None else torch.zeros_like(deltas[0].a)
    for coeff, delta in zip(coeffs.tolist(), deltas, strict=True):
        if coeff != 0.0:
            b += coeff * delta.b
            a += coeff * delta.a
    return b, a


def _latest_factors(latest: LoraAdapter | None, module: str, space: Space,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    if latest is None:
        return None
    if space == "delta":
        return latest.delta_factors(module, dtype)
    b, a = latest.lora_factors(module, dtype)
    return b * latest.modules[module].scale, a


def personalize(
    vectors: Sequence[TaskVector],
    weights: WeightTable,
    plan: MergePlan,
    *,
    rank: int | None,
    refactor: Refactor = "svd",
    space: Space = "delta",
    personal_heads: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> list[MergedAdapter]:
    """Build every target's personalized adapter, streaming module by module.

    Each module's task-vector factors are read once for all K clients and merged for
    every target before the next module is read.

    Args:
        vectors: the K task vectors (index k matches the weights' columns).
        weights: personalized weights (rows are targets, columns peers).
        plan: targets, contributions and each target's latest personalized adapter.
        rank: output rank for "svd" (ignored by "cat", which keeps the exact rank).
        refactor: "svd" truncates to ``rank``; "cat" is exact, its rank grows.
        space: "delta" merges ΔW exactly; "params" sums A and B separately (FedIT).
        personal_heads: dense modules (heads) take only the client's own update.
    """
    outputs = [MergedAdapter(space=space) for _ in plan.targets]
    if not vectors:
        return outputs
    lora_modules = list(vectors[0].lora_modules)
    names = lora_modules + list(vectors[0].dense_params)
    for module in progress(names) if progress else names:
        is_dense = module not in vectors[0].upload.modules
        deltas = [v.delta(module, space) for v in vectors]
        check_params_ranks(module, deltas, [v.name for v in vectors])
        for out, target, latest in zip(outputs, plan.targets, plan.latest, strict=True):
            coeffs = _coefficients(weights, module, target, plan)
            if is_dense:
                out.dense[module] = _merge_dense(latest, module, deltas, coeffs, target,
                                                 plan, personal_heads, dtype)
                continue
            base = _latest_factors(latest, module, space, dtype)
            if space == "params":
                if base is not None:
                    check_params_ranks(module, [ParamsDelta(base[1], base[0]), deltas[0]],
                                       [f"latest of {vectors[target].name}", vectors[0].name])
                out.modules[module] = _merge_params(base, deltas, coeffs)
                out.discarded_energy[module] = 0.0
            else:
                u, v, energy = _merge_lowrank(base, deltas, coeffs,
                                              None if refactor == "cat" else rank, dtype)
                out.modules[module] = (u, v)
                out.discarded_energy[module] = energy
    return outputs


def _merge_dense(latest: LoraAdapter | None, name: str, deltas: Sequence[DenseDelta],
                 coeffs: torch.Tensor, target: int, plan: MergePlan, personal_heads: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    value = (latest.dense_tensor(name, dtype) if latest is not None and name in latest.dense
             else torch.zeros_like(deltas[0].value))
    if personal_heads:
        coeffs = torch.zeros_like(coeffs)
        coeffs[target] = plan.contribution[target]
    for coeff, delta in zip(coeffs.tolist(), deltas, strict=True):
        if coeff != 0.0:
            value = value + coeff * delta.value
    return value
