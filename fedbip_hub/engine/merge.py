"""Personalized merges: ΔW̄ᵢ ← ΔW̄ᵢ + Σₖ wᵢₖ·τₖ, re-factorised to a LoRA adapter."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fedbip_hub.adapters.config import LoraAdapterConfig
from fedbip_hub.adapters.lora import LoraAdapter, save_lora_adapter
from fedbip_hub.engine.compute import delta_to, resolve_device
from fedbip_hub.engine.stacked_merge import (
    Merged,
    PairGrams,
    Part,
    batch_bytes,
    merge_batched,
    merge_cached,
    merge_exact_dtype,
)
from fedbip_hub.engine.strategies import WeightTable
from fedbip_hub.engine.task_vectors import (
    DenseDelta,
    LowRankDelta,
    ModuleDelta,
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
class MergedModule:
    """One target's merged module, on the CPU, as a streaming sink receives it.

    ``factors`` is (U, V) for a LoRA module, ``dense`` the full tensor of a dense one.
    """

    module: str
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    dense: torch.Tensor | None = None
    discarded_energy: float = 0.0


# Receives (target index, merged module) as soon as it is ready; see personalize().
MergeSink = Callable[[int, MergedModule], None]


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


def _lowrank_parts(base: tuple[torch.Tensor, torch.Tensor] | None,
                   deltas: Sequence[LowRankDelta], coeffs: torch.Tensor, dtype: torch.dtype
                   ) -> list[Part]:
    """The terms of one target's sum: its latest adapter, then the peers with weight."""
    parts = []
    if base is not None and torch.count_nonzero(base[0]) > 0:
        parts.append(Part(None, 1.0, base[0].to(device=deltas[0].u.device, dtype=dtype),
                          base[1].to(device=deltas[0].v.device, dtype=dtype)))
    for k, coeff in _nonzero(coeffs, len(deltas)):  # O(peers with weight), not O(K)
        parts.append(Part(k, coeff, deltas[k].u, deltas[k].v))
    return parts


def _zero_lowrank(deltas: Sequence[LowRankDelta], rank: int | None) -> Merged:
    """Nothing to add and a zero start: a zero adapter of the requested rank."""
    first, r = deltas[0], rank or 1
    return Merged(first.u.new_zeros(first.u.shape[0], r).cpu(),
                  first.v.new_zeros(r, first.v.shape[1]).cpu(), 0.0)


def _merge_parts(parts: Sequence[Part], rank: int | None, grams: PairGrams | None
                 ) -> Merged:
    if parts[0].u.dtype == torch.float64:  # the exactness-check dtype: QR, exact at fp64
        return merge_exact_dtype(parts, rank)
    return merge_cached(parts, rank, grams if grams is not None else PairGrams())


def _merge_lowrank(base: tuple[torch.Tensor, torch.Tensor] | None,
                   deltas: Sequence[LowRankDelta], coeffs: torch.Tensor,
                   rank: int | None, dtype: torch.dtype, grams: PairGrams | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    parts = _lowrank_parts(base, deltas, coeffs, dtype)
    merged = _merge_parts(parts, rank, grams) if parts else _zero_lowrank(deltas, rank)
    return merged.u, merged.v, merged.discarded_energy


def _merge_params(base: tuple[torch.Tensor, torch.Tensor] | None,
                  deltas: Sequence[ParamsDelta], coeffs: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    b = base[0].to(deltas[0].b.device, copy=True) if base is not None else \
        torch.zeros_like(deltas[0].b)
    a = base[1].to(deltas[0].a.device, copy=True) if base is not None else \
        torch.zeros_like(deltas[0].a)
    for k, coeff in _nonzero(coeffs, len(deltas)):
        b += coeff * deltas[k].b
        a += coeff * deltas[k].a
    return b, a


def _nonzero(coeffs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """(peer, coefficient) for the non-zero coefficients only: with top-k weights a
    target's merge touches k peers, not all K."""
    if coeffs.numel() != k:
        raise ValueError(f"{coeffs.numel()} coefficients for {k} task vectors")
    index = torch.nonzero(coeffs).flatten()
    return list(zip(index.tolist(), coeffs[index].tolist(), strict=True))


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
    device: torch.device | str | None = None,
    sink: MergeSink | None = None,
    max_resident: int | None = None,
    batched: bool | None = None,
) -> list[MergedAdapter]:
    """Build every target's personalized adapter, streaming module by module.

    Each module's task-vector factors are read once for all K clients and merged for
    every target before the next module is read. Without a ``sink`` the merged factors
    of all targets accumulate in the returned adapters (in memory); with one, each
    merged module goes to ``sink(target_index, MergedModule)`` as soon as it is ready
    and the returned adapters keep only the discarded energies (see
    ``fedbip_hub.server.streaming.StagingArea``, which spills them to disk).

    Args:
        vectors: the K task vectors (index k matches the weights' columns).
        weights: personalized weights (rows are targets, columns peers).
        plan: targets, contributions and each target's latest personalized adapter.
        rank: output rank for "svd" (ignored by "cat", which keeps the exact rank).
        refactor: "svd" truncates to ``rank``; "cat" is exact, its rank grows.
        space: "delta" merges ΔW exactly; "params" sums A and B separately (FedIT).
        personal_heads: dense modules (heads) take only the client's own update.
        dtype: compute dtype (inputs are upcast to it, never narrowed).
        device: where the QR/SVD maths runs ("cpu", "cuda", "auto"; default: the CPU);
            merged factors come back to the CPU.
        sink: receives each merged module instead of the returned adapters.
        max_resident: read a module's task vectors on demand and keep at most this many
            in memory (least recently used first out). With sparse (top-k) weights a
            target reads only its k peers, so memory stops growing with K; the results
            are the same. None (default): read all K once per module (delta space only;
            the params space always reads all K).
        batched: merge a module's targets in batches of equal shapes, one batched
            kernel call per chunk (``stacked_merge.merge_batched``), instead of one
            target at a time with shared peer-pair Gram blocks (``merge_cached``).
            None (default): batched on CUDA, per target on the CPU, where it measured
            faster. Both give the same results to fp32 rounding.
    """
    outputs = [MergedAdapter(space=space) for _ in plan.targets]
    if not vectors:
        return outputs
    target_device = resolve_device(device) if device is not None else None
    if batched is None:
        batched = target_device is not None and target_device.type == "cuda"
    lora_modules = list(vectors[0].lora_modules)
    names = lora_modules + list(vectors[0].dense_params)
    for module in progress(names) if progress else names:
        is_dense = module not in vectors[0].upload.modules
        deltas = None  # drop the previous module's K factors before reading this one's
        deltas = _module_deltas(vectors, module, space, target_device, dtype, max_resident)
        order = (_locality_order(weights, module, plan) if isinstance(deltas, LazyDeltas)
                 else range(len(plan.targets)))
        grams = PairGrams()  # this module's peer-pair Gram blocks, shared by its targets
        last_base: tuple[LoraAdapter | None, tuple[torch.Tensor, torch.Tensor] | None] | None
        last_base = None  # first-round targets all start from the initial adapter: read once
        pending = _Pending(batched, rank=None if refactor == "cat" else rank)
        for index in order:
            out, target, latest = outputs[index], plan.targets[index], plan.latest[index]
            coeffs = _coefficients(weights, module, target, plan)
            if is_dense:
                value = _merge_dense(latest, module, deltas, coeffs, target, plan,
                                     personal_heads, dtype)
                _emit(out, index, MergedModule(module, dense=value.cpu()), sink)
                continue
            if last_base is not None and last_base[0] is latest:
                base = last_base[1]
            else:
                base = _latest_factors(latest, module, space, dtype)
                last_base = (latest, base)
            if space == "params":
                if base is not None:
                    check_params_ranks(module, [ParamsDelta(base[1], base[0]), deltas[0]],
                                       [f"latest of {vectors[target].name}", vectors[0].name])
                b, a = _merge_params(base, deltas, coeffs)
                _emit(out, index, MergedModule(module, factors=(b.cpu(), a.cpu())), sink)
                continue
            parts = _lowrank_parts(base, deltas, coeffs, dtype)
            if not parts:
                merged = _zero_lowrank(deltas, pending.rank)
            elif not pending.batched:
                merged = _merge_parts(parts, pending.rank, grams)
            else:
                for ready, result in pending.add(index, parts):
                    _emit_lowrank(outputs, ready, module, result, sink)
                continue
            _emit_lowrank(outputs, index, module, merged, sink)
        for ready, result in pending.flush():
            _emit_lowrank(outputs, ready, module, result, sink)
    return outputs


class _Pending:
    """Targets waiting for a batched merge; released a chunk at a time, so that at most
    one chunk's stacks and outputs are alive (the streaming round's peak RSS)."""

    def __init__(self, batched: bool, rank: int | None):
        self.batched = batched
        self.rank = rank
        self._jobs: list[tuple[int, list[Part]]] = []
        self._bytes = 0

    def add(self, index: int, parts: list[Part]) -> list[tuple[int, Merged]]:
        self._jobs.append((index, parts))
        self._bytes += sum(8 * p.rank * (p.u.shape[0] + p.v.shape[1]) for p in parts)
        return self.flush() if self._bytes >= batch_bytes(parts[0].u.device) else []

    def flush(self) -> list[tuple[int, Merged]]:
        jobs, self._jobs, self._bytes = self._jobs, [], 0
        if not jobs:
            return []
        exact = [j for j in jobs if j[1][0].u.dtype == torch.float64]
        fast = [j for j in jobs if j[1][0].u.dtype != torch.float64]
        done = [(index, merge_exact_dtype(parts, self.rank)) for index, parts in exact]
        merged = merge_batched([parts for _, parts in fast], self.rank)
        done += [(index, m) for (index, _), m in zip(fast, merged, strict=True)]
        return done


def _emit_lowrank(outputs: list[MergedAdapter], index: int, module: str, merged: Merged,
                  sink: MergeSink | None) -> None:
    _emit(outputs[index], index, MergedModule(module, factors=(merged.u, merged.v),
                                              discarded_energy=merged.discarded_energy),
          sink)


def _emit(out: MergedAdapter, index: int, result: MergedModule, sink: MergeSink | None
          ) -> None:
    if result.factors is not None:
        out.discarded_energy[result.module] = result.discarded_energy
    if sink is not None:
        sink(index, result)
    elif result.factors is not None:
        out.modules[result.module] = result.factors
    else:
        out.dense[result.module] = result.dense


def _module_deltas(vectors: Sequence[TaskVector], module: str, space: Space,
                   device: torch.device | None, dtype: torch.dtype,
                   max_resident: int | None) -> Sequence[ModuleDelta]:
    if max_resident is None or max_resident >= len(vectors) or space == "params":
        deltas = [delta_to(v.delta(module, space), device, dtype) for v in vectors]
        check_params_ranks(module, deltas, [v.name for v in vectors])
        return deltas
    return LazyDeltas(vectors, module, space, device, dtype, max_resident)


def _locality_order(weights: WeightTable, module: str, plan: MergePlan) -> list[int]:
    """Target positions sorted by their peer sets, so that targets drawing on the same
    peers run one after another and a bounded cache of factors re-reads few of them
    (each target's merge does not depend on the order)."""
    rows = weights.for_module(module).to(torch.float64) * plan.contribution
    keys = [(tuple(torch.nonzero(rows[target]).flatten().tolist()), index)
            for index, target in enumerate(plan.targets)]
    return [index for _, index in sorted(keys)]


class LazyDeltas(Sequence[ModuleDelta]):
    """One module's K task-vector deltas, read on demand, at most ``capacity`` kept (LRU).

    ``reads`` counts the reads from disk (K once each when nothing is evicted).
    """

    def __init__(self, vectors: Sequence[TaskVector], module: str, space: Space,
                 device: torch.device | None, dtype: torch.dtype, capacity: int):
        self._vectors = vectors
        self._module = module
        self._space = space
        self._device = device
        self._dtype = dtype
        self._capacity = max(1, capacity)
        self._cache: OrderedDict[int, ModuleDelta] = OrderedDict()
        self.reads = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def __getitem__(self, k):  # type: ignore[override]  (int indices only)
        cached = self._cache.get(k)
        if cached is not None:
            self._cache.move_to_end(k)
            return cached
        delta = delta_to(self._vectors[k].delta(self._module, self._space), self._device,
                         self._dtype)
        self.reads += 1
        self._cache[k] = delta
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return delta


def _merge_dense(latest: LoraAdapter | None, name: str, deltas: Sequence[DenseDelta],
                 coeffs: torch.Tensor, target: int, plan: MergePlan, personal_heads: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    value = (latest.dense_tensor(name, dtype).to(deltas[0].value.device)
             if latest is not None and name in latest.dense
             else torch.zeros_like(deltas[0].value))
    if personal_heads:
        coeffs = torch.zeros_like(coeffs)
        coeffs[target] = plan.contribution[target]
    for k, coeff in _nonzero(coeffs, len(deltas)):
        value = value + coeff * deltas[k].value
    return value
