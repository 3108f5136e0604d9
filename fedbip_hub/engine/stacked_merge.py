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

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from fedbip_hub.engine.lowrank import gram_core, refactorize

F64 = torch.float64
CPU = torch.device("cpu")
# Output products run in fp32 while they amplify rounding by at most this much (see
# _fp32_products_suffice); 0 makes them always float64.
FP32_AMPLIFICATION = 4.0
# Bytes of stacked float64 factors (U and V) one batched chunk may hold: large on a GPU,
# small on the CPU, where a chunk's stacks count towards the round's peak RSS.
BATCH_BYTES = {"cuda": 1024 * 2**20, "cpu": 64 * 2**20}
# Bytes of the slab of peers' float64 factors one module's PairGrams keeps (LRU slots):
# in locality order a peer is then converted once per module, not once per target that
# stacks it (16 peers of a 4096×4096 r=16 module); bounded, so peak RSS stays flat in K.
FACTOR_CACHE_BYTES = 16 * 2**20


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
    """One module's float64 Gram blocks between peers, U_aᵀU_b and V_aV_bᵀ (a ≤ b), and
    a bounded cache of the peers' float64 factors they are formed from.

    Blocks are unscaled (a target's coefficients enter when its Gram is assembled), so
    every target that stacks peers a and b reuses the block. ``computed`` counts the
    blocks formed and ``upcasts`` the factor pairs converted to float64 (tests check the
    sharing). Use one per module and drop it after: it holds r² float64 pairs per pair
    of peers that some target stacks together, and at most ``factor_bytes`` of factors.
    """

    def __init__(self, factor_bytes: int | None = None) -> None:
        self._blocks: dict[tuple[Hashable, Hashable], tuple[torch.Tensor, torch.Tensor]] = {}
        self._max_factor_bytes = FACTOR_CACHE_BYTES if factor_bytes is None else factor_bytes
        self._slab: torch.Tensor | None = None  # (slots, d_out + d_in, r) float64
        self._slots: OrderedDict[Hashable, int] = OrderedDict()  # peer → slot, LRU first
        self._in_use: set[int] = set()  # slots of the current target's parts
        self.computed = 0
        self.upcasts = 0

    def get(self, a: Hashable, b: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        if (a, b) in self._blocks:
            return self._blocks[(a, b)]
        pair = self._blocks.get((b, a))
        return None if pair is None else (pair[0].T, pair[1].T)

    def put(self, a: Hashable, b: Hashable, gu: torch.Tensor, gv: torch.Tensor) -> None:
        self._blocks[(a, b)] = (gu, gv)
        self.computed += 1

    def factors(self, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        """U and Vᵀ of ``part`` in float64, both d×r and row-major: Gram blocks are then
        Uᵢᵀ·Uⱼ and (Vᵀ)ᵢᵀ·(Vᵀ)ⱼ, the layout the BLAS runs fastest for these skinny
        products. Peers' pairs are kept in the slots of one preallocated slab (least
        recently used out): converting into fixed slots allocates nothing per peer,
        where separate copies fragmented the heap (+60 MiB peak RSS in a K=64 round). A
        target's own part (key None), or a peer of another shape, is converted each time.
        """
        d_out, d_in = part.u.shape[0], part.v.shape[1]
        slot = self._slot(part) if part.key is not None else None
        if slot is not None and slot[1]:
            return self._split(self._slab[slot[0]], d_out)  # type: ignore[index]
        buffer = (self._slab[slot[0]] if slot is not None  # type: ignore[index]
                  else torch.empty((d_out + d_in, part.rank), dtype=F64, device=part.u.device))
        buffer[:d_out].copy_(part.u)
        buffer[d_out:].copy_(part.v.T)
        self.upcasts += 1
        return self._split(buffer, d_out)

    @staticmethod
    def _split(buffer: torch.Tensor, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return buffer[:d_out], buffer[d_out:]

    def _slot(self, part: Part) -> tuple[int, bool] | None:
        """(slot, whether it already holds the part) for a peer, or None when the slab
        cannot hold it. The slab is shaped by the first peer asked for."""
        shape = (part.u.shape[0] + part.v.shape[1], part.rank)
        if self._slab is None:
            count = self._max_factor_bytes // (8 * shape[0] * shape[1])
            if count < 1:
                return None
            self._slab = torch.empty((count, *shape), dtype=F64, device=part.u.device)
        if tuple(self._slab.shape[1:]) != shape or self._slab.device != part.u.device:
            return None
        if part.key in self._slots:
            self._slots.move_to_end(part.key)
            index, held = self._slots[part.key], True
        elif len(self._slots) < self._slab.shape[0]:
            index, held = len(self._slots), False
        else:  # evict the least recently used peer that this target does not stack
            victim = next((key for key, index in self._slots.items()
                           if index not in self._in_use), None)
            if victim is None:
                return None
            index, held = self._slots.pop(victim), False
        self._slots[part.key] = index
        self._in_use.add(index)
        return index, held

    def begin_target(self) -> None:
        """A new target: the slots the previous one used may be reused (a target's own
        parts never evict each other, which would overwrite factors still in use)."""
        self._in_use.clear()


def _bounds(parts: Sequence[Part]) -> list[int]:
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + p.rank)
    return bounds


def _target_factors(parts: Sequence[Part], cache: PairGrams
                    ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Part m's float64 (U, Vᵀ), converted once per target for its Grams and products."""
    factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(parts)

    def factors_of(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if factors[m] is None:
            factors[m] = cache.factors(parts[m])
        return factors[m]  # type: ignore[return-value]

    return factors_of


def _cached_grams(parts: Sequence[Part], cache: PairGrams,
                  factors_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled Gram matrices of the stacked parts, block by block: blocks between two
    peers come from the cache, the others are formed from the parts' float64 factors
    (``factors_of``). In locality order a target then forms blocks only for the peers
    new to its group and for its own part."""
    n = len(parts)
    blocks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(n):
        for j in range(i, n):
            a, b = parts[i].key, parts[j].key
            shared = a is not None and b is not None
            pair = cache.get(a, b) if shared else None
            if pair is None:
                (u_i, vt_i), (u_j, vt_j) = factors_of(i), factors_of(j)
                pair = (u_i.T @ u_j, vt_i.T @ vt_j)
                if shared:
                    cache.put(a, b, *pair)
            blocks[(i, j)] = pair

    def block(i: int, j: int, side: int) -> torch.Tensor:
        return blocks[(i, j)][side] if i <= j else blocks[(j, i)][side].T

    def assemble(side: int) -> torch.Tensor:
        ranks = {p.rank for p in parts}
        if len(ranks) == 1:  # equal ranks: one stack and one copy, not n + 1 concatenations
            r = ranks.pop()
            return torch.stack([block(i, j, side) for i in range(n) for j in range(n)]
                               ).reshape(n, n, r, r).transpose(1, 2).reshape(n * r, n * r)
        return torch.cat([torch.cat([block(i, j, side) for j in range(n)], dim=1)
                          for i in range(n)], dim=0)

    return assemble(0), assemble(1)


def _column_scale(parts: Sequence[Part], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(p.coeff) for p in parts for _ in range(p.rank)], dtype=F64,
                        device=device)


def merge_cached(parts: Sequence[Part], rank: int | None, cache: PairGrams) -> Merged:
    """One target's re-factorised sum, its peer-pair Gram blocks shared through ``cache``.

    With D the diagonal of the parts' coefficients, ΔW = U·D·V: the Gram of U·D is
    D·(UᵀU)·D, and the output U' = U·(D·wu), so the d-sized stacks stay unscaled.
    """
    if not parts:
        raise ValueError("nothing to merge")
    bounds = _bounds(parts)
    cache.begin_target()
    factors_of = _target_factors(parts, cache)
    gram_u, gram_v = _cached_grams(parts, cache, factors_of)
    scale = _column_scale(parts, gram_u.device)
    core = gram_core((gram_u * scale[:, None] * scale[None, :])[None], gram_v[None], rank)
    # (the core's scaled Gram is not needed again: the output products use the unscaled
    # stack, so their rounding is measured against it)
    width = _width(rank, int(core.keep[0]))
    if (rank is None and width == bounds[-1]  # "cat" of a full-rank stack
            and _stack_is_exact(gram_u.diagonal(), gram_v.diagonal(), scale, core.sigma[0],
                                parts[0].u.dtype)):
        return _balanced_stack(torch.cat([p.u for p in parts], dim=1),
                               torch.cat([p.v for p in parts], dim=0),
                               gram_u.diagonal(), gram_v.diagonal(), scale)
    wu, wv = scale[:, None] * core.wu[0, :, :width], core.wv[0, :width]
    dtype = parts[0].u.dtype
    if _fp32_products_suffice(gram_u, gram_v, wu, wv, core.sigma[0, :width], dtype):
        u_out, v_out = _products_by_part(parts, bounds, wu.to(dtype), wv.to(dtype))
    else:  # float64, from the same float64 factors the Grams came from
        u_out, v_out = _products_by_part([factors_of(m) for m in range(len(parts))], bounds, wu, wv,
                                         transposed_v=True)
        u_out, v_out = u_out.to(dtype), v_out.to(dtype)
    return Merged(u_out.cpu(), v_out.cpu(), float(core.discarded[0]))


def _products_by_part(factors: Sequence[Part] | Sequence[tuple[torch.Tensor, torch.Tensor]],
                      bounds: Sequence[int], wu: torch.Tensor, wv: torch.Tensor, *,
                      transposed_v: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """U·wu and wv·V as sums of per-part products accumulated into one output each, so
    the d-sized factors are read in place instead of copied into a stack first.
    ``factors`` are parts, or (U, Vᵀ) pairs with ``transposed_v``."""
    pairs = [(f.u, f.v) if isinstance(f, Part) else f for f in factors]

    def v_of(m: int) -> torch.Tensor:
        return pairs[m][1].T if transposed_v else pairs[m][1]

    first = slice(bounds[0], bounds[1])
    u_out, v_out = pairs[0][0] @ wu[first], wv[:, first] @ v_of(0)
    for m in range(1, len(pairs)):
        rows = slice(bounds[m], bounds[m + 1])
        u_out.addmm_(pairs[m][0], wu[rows])
        v_out.addmm_(wv[:, rows], v_of(m))
    return u_out, v_out


def _balanced_stack(u: torch.Tensor, v: torch.Tensor, norms_u: torch.Tensor,
                    norms_v: torch.Tensor, scale: torch.Tensor) -> Merged:
    """The exact "cat" of a stack with nothing to compress: the stacked factors
    themselves (as PEFT's cat does), each direction rescaled towards equal norms on both
    sides, at O(d·R) instead of two d×R×R products."""
    nu = norms_u.clamp_min(0).sqrt() * scale.abs()
    nv = norms_v.clamp_min(0).sqrt()
    ratio = torch.where((nu > 0) & (nv > 0), (nv / torch.where(nu > 0, nu, 1.0)).sqrt(), 1.0)
    ratio = torch.exp2(torch.round(torch.log2(ratio)))  # powers of two rescale exactly
    col = (scale * ratio).to(u.dtype)
    row = (1.0 / ratio).to(v.dtype)
    return Merged((u * col).cpu(), (v * row[:, None]).cpu(), 0.0)


def _stack_is_exact(norms_u: torch.Tensor, norms_v: torch.Tensor, scale: torch.Tensor,
                    sigma: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the scaled stack itself is as exact as the SVD form: storing c·u in the
    inputs' precision errs by ε·Σ|c|·‖u‖·‖v‖, against ‖ΔW‖ = √Σσ² for the SVD form, so
    the stack is used only while the terms do not cancel much. (Independent roundings
    add in quadrature: ‖Σ_j ε_j·c_j·u_j·v_jᵀ‖ ≈ ε·√Σ_j c_j²‖u_j‖²‖v_j‖².)"""
    total = float((sigma**2).sum())
    if dtype != torch.float32 or total <= 0:
        return False
    terms = float((scale**2 * norms_u.clamp_min(0) * norms_v.clamp_min(0)).sum())
    return math.sqrt(terms / total) <= FP32_AMPLIFICATION


def _fp32_products_suffice(gram_u: torch.Tensor, gram_v: torch.Tensor, wu: torch.Tensor,
                           wv: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the two d-sized output products may run in the inputs' fp32.

    Their rounding error is about ε₃₂·√(Σ_j ‖U_j‖²·‖wu_j‖²) against an output of norm
    ‖U'‖ = √Σσ (and likewise for V), so fp32 is as exact as the inputs while that ratio
    stays small. ``gram_u`` is the Gram of the stack the product runs on (unscaled: the
    coefficients are in ``wu``, counted once). A sum that nearly cancels (near-duplicate
    clients) amplifies by about 1/(1 − cos) and takes float64, which is exact to the
    inputs' precision.
    """
    if dtype != torch.float32:
        return False
    out = float(sigma.sum())
    if out <= 0:
        return False
    amp_u = float((gram_u.diagonal().clamp_min(0) * (wu * wu).sum(dim=1)).sum()) / out
    amp_v = float((gram_v.diagonal().clamp_min(0) * (wv * wv).sum(dim=0)).sum()) / out
    return math.sqrt(max(amp_u, amp_v)) <= FP32_AMPLIFICATION


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
