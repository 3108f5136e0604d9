"""Re-factorising one module's weighted sums of low-rank parts, many targets at a time.

A target's merged module is ΔW = Σ_p c_p·U_p·V_p over its parts (its latest adapter
and the peers it weighs), re-factorised by ``lowrank.gram_core`` from the float64 Grams
of the stacked factors. Two ways to run a module's targets, with equal results to fp32
rounding (each is checked against the other in tests/test_stacked_merge.py):

* ``merge_cached``, one target at a time: the peer-pair Gram blocks U_kᵀU_j and
  V_kV_jᵀ are computed once per module and shared by every target that stacks both
  peers (top-k targets of one task group stack mostly the same peers), so a target pays
  O(d·R·r) for the cross terms with its own adapter and its outputs, not O(d·R²). The
  CPU default (measured faster there: benchmarks/bench_scale.py (b)).
* ``merge_batched``: the targets of equal shapes go through one batched Gram, eigh and
  output product per chunk, and come back through pinned memory with non-blocking
  copies, synchronised once per chunk. The GPU default (``--device cuda``), where one
  target at a time would be bound by kernel-launch latency.

Factors are upcast to float64 inside, so fp32 inputs stay exact to their precision even
when a sum nearly cancels (near-duplicate clients); float64 inputs go through QR instead
(``lowrank.refactorize``), which is backward stable at that precision.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from fedbip_hub.lowrank import gram_core, refactorize

F64 = torch.float64
CPU = torch.device("cpu")
# Bytes of stacked float64 factors (U and V) one batched chunk may hold: large on a GPU,
# small on the CPU, where a chunk's stacks count towards the round's peak RSS.
BATCH_BYTES = {"cuda": 1024 * 2**20, "cpu": 64 * 2**20}


def batch_bytes(device: torch.device) -> int:
    return BATCH_BYTES.get(device.type, BATCH_BYTES["cpu"])


@dataclass(frozen=True)
class Part:
    """One term c·U·V of a target's sum; ``key`` names a peer whose Gram blocks can be
    shared across targets (None: this target's own, e.g. its latest adapter)."""

    key: Hashable | None
    coeff: float
    u: torch.Tensor
    v: torch.Tensor

    @property
    def rank(self) -> int:
        return self.u.shape[1]


@dataclass(frozen=True)
class Merged:
    """A re-factorised sum: ΔW = u·v, on the CPU, and the truncation's discarded energy."""

    u: torch.Tensor
    v: torch.Tensor
    discarded_energy: float


def _zero(parts: Sequence[Part], width: int) -> Merged:
    first = parts[0]
    return Merged(first.u.new_zeros(first.u.shape[0], width).cpu(),
                  first.v.new_zeros(width, first.v.shape[1]).cpu(), 0.0)


def _width(rank: int | None, keep: int) -> int:
    return rank if rank is not None else max(keep, 1)


def merge_exact_dtype(parts: Sequence[Part], rank: int | None) -> Merged:
    """The float64 path: QR of the stacked factors (``lowrank.refactorize_qr``)."""
    u = torch.cat([p.u * p.coeff for p in parts], dim=1)
    v = torch.cat([p.v for p in parts], dim=0)
    out = refactorize(u, v, rank)
    return Merged(out.u.cpu(), out.v.cpu(), out.discarded_energy)


class PairGrams:
    """One module's float64 Gram blocks between peers, U_aᵀU_b and V_aV_bᵀ (a ≤ b).

    Unscaled (a target's coefficients enter when its Gram is assembled), so every
    target that stacks peers a and b reuses the block. ``computed`` counts the blocks
    formed (tests check the sharing). Use one per module and drop it after.
    """

    def __init__(self) -> None:
        self._blocks: dict[tuple[Hashable, Hashable], tuple[torch.Tensor, torch.Tensor]] = {}
        self.computed = 0

    def get(self, a: Hashable, b: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        if (a, b) in self._blocks:
            return self._blocks[(a, b)]
        pair = self._blocks.get((b, a))
        return None if pair is None else (pair[0].T, pair[1].T)

    def put(self, a: Hashable, b: Hashable, gu: torch.Tensor, gv: torch.Tensor) -> None:
        self._blocks[(a, b)] = (gu, gv)
        self.computed += 1


def _cached_grams(parts: Sequence[Part], u64: Sequence[torch.Tensor],
                  v64: Sequence[torch.Tensor], cache: PairGrams
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled Gram matrices of the stacked parts, from the cache where both are peers;
    each row's missing blocks are formed in one product against the stacked columns."""
    n = len(parts)
    rows_u: list[list[torch.Tensor | None]] = [[None] * n for _ in range(n)]
    rows_v: list[list[torch.Tensor | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        missing = []
        for j in range(i, n):
            shared = (parts[i].key is not None and parts[j].key is not None)
            hit = cache.get(parts[i].key, parts[j].key) if shared else None
            if hit is None:
                missing.append(j)
            else:
                rows_u[i][j], rows_v[i][j] = hit
        if missing:
            gu = u64[i].T @ torch.cat([u64[j] for j in missing], dim=1)
            gv = v64[i] @ torch.cat([v64[j] for j in missing], dim=0).T
            at = 0
            for j in missing:
                width = parts[j].rank
                rows_u[i][j], rows_v[i][j] = gu[:, at:at + width], gv[:, at:at + width]
                at += width
                if parts[i].key is not None and parts[j].key is not None:
                    cache.put(parts[i].key, parts[j].key, rows_u[i][j], rows_v[i][j])
        for j in range(i):
            rows_u[i][j], rows_v[i][j] = rows_u[j][i].T, rows_v[j][i].T  # type: ignore[union-attr]
    gram_u = torch.cat([torch.cat(row, dim=1) for row in rows_u], dim=0)  # type: ignore[arg-type]
    gram_v = torch.cat([torch.cat(row, dim=1) for row in rows_v], dim=0)  # type: ignore[arg-type]
    return gram_u, gram_v


def _column_scale(parts: Sequence[Part], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.full((p.rank,), float(p.coeff), dtype=F64, device=device)
                      for p in parts])


def merge_cached(parts: Sequence[Part], rank: int | None, cache: PairGrams) -> Merged:
    """One target's re-factorised sum, its peer-pair Gram blocks shared through ``cache``."""
    if not parts:
        raise ValueError("nothing to merge")
    u64 = [p.u.to(F64) for p in parts]
    v64 = [p.v.to(F64) for p in parts]
    gram_u, gram_v = _cached_grams(parts, u64, v64, cache)
    scale = _column_scale(parts, gram_u.device)
    core = gram_core((gram_u * scale[:, None] * scale[None, :])[None], gram_v[None], rank)
    width = _width(rank, int(core.keep[0]))
    u_cat = torch.cat([u * p.coeff for u, p in zip(u64, parts, strict=True)], dim=1)
    u_out = (u_cat @ core.wu[0, :, :width]).to(parts[0].u.dtype)
    v_out = (core.wv[0, :width] @ torch.cat(v64, dim=0)).to(parts[0].v.dtype)
    return Merged(u_out.cpu(), v_out.cpu(), float(core.discarded[0]))


def _pinned(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def merge_batched(jobs: Sequence[Sequence[Part]], rank: int | None) -> list[Merged]:
    """Every job's re-factorised sum, jobs of equal shapes batched per kernel call.

    Jobs are grouped by (d_out, stacked R, d_in) and chunked to ``batch_bytes``; each
    chunk is one batched Gram (bmm), one ``gram_core`` (batched Cholesky/eigh) and one
    batched output product. On CUDA the results land in pinned CPU buffers through
    non-blocking copies, and the host waits once per chunk.
    """
    results: list[Merged | None] = [None] * len(jobs)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for index, parts in enumerate(jobs):
        if not parts:
            raise ValueError("nothing to merge")
        shape = (parts[0].u.shape[0], sum(p.rank for p in parts), parts[0].v.shape[1])
        groups.setdefault(shape, []).append(index)
    for (d_out, width_in, d_in), members in groups.items():
        per_job = 8 * width_in * (d_out + d_in)
        chunk = max(1, batch_bytes(jobs[members[0]][0].u.device) // max(per_job, 1))
        for start in range(0, len(members), chunk):
            batch = members[start:start + chunk]
            for index, merged in zip(batch, _merge_chunk([jobs[i] for i in batch], rank),
                                     strict=True):
                results[index] = merged
    return results  # type: ignore[return-value]


def _merge_chunk(jobs: Sequence[Sequence[Part]], rank: int | None) -> list[Merged]:
    device = jobs[0][0].u.device
    u = torch.stack([torch.cat([p.u.to(F64) * p.coeff for p in parts], dim=1)
                     for parts in jobs])
    v = torch.stack([torch.cat([p.v.to(F64) for p in parts], dim=0) for parts in jobs])
    core = gram_core(u.mT @ u, v @ v.mT, rank)
    width = _width(rank, int(core.keep.max()))
    out_dtype = jobs[0][0].u.dtype
    u_out = (u @ core.wu[..., :width]).to(out_dtype)
    v_out = (core.wv[:, :width] @ v).to(out_dtype)
    discarded = core.discarded
    keep = core.keep
    if device.type == "cuda":  # async copies into pinned memory, one wait per chunk
        pin = True
        host_u = _pinned(tuple(u_out.shape), out_dtype, pin)
        host_v = _pinned(tuple(v_out.shape), out_dtype, pin)
        host_d = _pinned(tuple(discarded.shape), F64, pin)
        host_k = _pinned(tuple(keep.shape), keep.dtype, pin)
        for host, dev in ((host_u, u_out), (host_v, v_out), (host_d, discarded),
                          (host_k, keep)):
            host.copy_(dev, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        u_out, v_out, discarded, keep = host_u, host_v, host_d, host_k
    out = []
    for item in range(len(jobs)):
        cols = _width(rank, int(keep[item]))
        out.append(Merged(u_out[item, :, :cols].clone(), v_out[item, :cols].clone(),
                          float(discarded[item])))
    return out
