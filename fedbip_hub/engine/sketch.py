"""Sketched task-vector similarity for large K: shared, seeded random projections.

For a LoRA module whose task vectors are ΔW_k = U_k·V_k (d_out×d_in, rank R_k), every
client is sketched with the *same* projections S_out (d_out×s) and S_in (d_in×s):

    M_k = S_outᵀ · ΔW_k · S_in = (S_outᵀ U_k)(V_k S_in)        (s×s)

S has i.i.d. entries of variance 1/s (Gaussian N(0, 1/s), or Rademacher ±1/√s), so
E[S Sᵀ] = I and, with S_out and S_in independent, ⟨M_i, M_j⟩_F is an unbiased estimate
of ⟨ΔW_i, ΔW_j⟩_F. A side with s ≥ d is not projected (it is exact). Each module draws
its own projections from (seed, module name): errors of different modules are
independent, so they average out in the layer and model sums.

Cost per module: O(K·(d_out+d_in)·R·s) for the projections, O(K·s²·R) to form the M_k
and O(K²·s²) for their Gram, against O((d_out+d_in)·(K·R)²) for the exact low-rank Gram.
The squared norms ‖ΔW_k‖² are computed exactly (O(K·d·R²)), for the norm guard; the
cosines use the sketched diagonal, whose errors are correlated with the off-diagonal
ones and partly cancel in the ratio.

Memory per module: the clients' factors are read, projected in chunks and dropped, so
only their sketched factors (K·2·s·R numbers) and one chunk pair of s×s sketches stay.

Dense modules (classification heads) are small and stay exact. The paper-literal
"params" space is not sketched.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from fedbip_hub.engine.compute import CPU, delta_to, resolve_device
from fedbip_hub.engine.lowrank import dense_gram
from fedbip_hub.engine.similarity import SimilarityReport, compute_similarity
from fedbip_hub.engine.task_vectors import DenseDelta, LowRankDelta, TaskVector, check_compatible
from fedbip_hub.errors import ConfigError

if TYPE_CHECKING:
    from fedbip_hub.engine.strategies import Strategy

SketchKind = Literal["gaussian", "rademacher"]
SimilarityMode = Literal["exact", "sketch"]
# Client chunks of the Gram are sized to keep their s×s sketches under this many bytes.
CHUNK_BYTES = 32 * 2**20
# Clients projected per GEMM (bounds the concatenated factors' copy).
PROJECT_CHUNK = 32


@dataclass(frozen=True)
class SketchSpec:
    """The sketch: size s, seed and distribution of the shared projections."""

    size: int = 256
    seed: int = 0
    kind: SketchKind = "gaussian"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"sketch size must be positive, got {self.size}.")
        if self.kind not in ("gaussian", "rademacher"):
            raise ConfigError(f"unknown sketch kind {self.kind!r}.",
                              hint="Use gaussian or rademacher.")

    def to_json(self) -> dict:
        return {"mode": "sketch", "sketch_size": self.size, "sketch_seed": self.seed,
                "sketch_kind": self.kind}


def derive_seed(*parts: object) -> int:
    """A 53-bit seed (exact as a JSON number) from text parts, stable across processes."""
    digest = hashlib.blake2b("\x00".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**53 - 1)  # exact in JSON


def projection(d: int, spec: SketchSpec, seed: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> torch.Tensor | None:
    """A d×s projection with E[S Sᵀ] = I, or None (no projection) when s ≥ d.

    Drawn on the CPU from its own generator, so a seed gives the same projection on
    every device.
    """
    if spec.size >= d:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # drawn in float32 (5× faster than float64 for the Gaussian, which was a third of a
    # sketched round's similarity): any fixed matrix of i.i.d. draws is as good a sketch
    if spec.kind == "gaussian":
        matrix = torch.randn(d, spec.size, generator=gen, dtype=torch.float32)
    else:
        matrix = torch.randint(0, 2, (d, spec.size), generator=gen,
                               dtype=torch.int8).to(torch.float32) * 2 - 1
    return (matrix * (1 / math.sqrt(spec.size))).to(device=device or CPU, dtype=dtype)


def module_projections(module: str, d_out: int, d_in: int, spec: SketchSpec, *,
                       dtype: torch.dtype = torch.float32, device: torch.device | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(S_out, S_in) of one module, drawn from (seed, module name, side)."""
    return (projection(d_out, spec, derive_seed(spec.seed, module, "out"), dtype=dtype,
                       device=device),
            projection(d_in, spec, derive_seed(spec.seed, module, "in"), dtype=dtype,
                       device=device))


def _stack_padded(parts: Sequence[torch.Tensor], rank_dim: int, r_max: int) -> torch.Tensor:
    """K tensors with ranks along ``rank_dim`` stacked with zero padding to r_max
    (zero directions add nothing to ΔW)."""
    padded = []
    for part in parts:
        missing = r_max - part.shape[rank_dim]
        if missing:
            shape = list(part.shape)
            shape[rank_dim] = missing
            part = torch.cat([part, part.new_zeros(shape)], dim=rank_dim)
        padded.append(part)
    return torch.stack(padded)


def sketch_factors(deltas: Iterable[LowRankDelta], s_out: torch.Tensor | None,
                   s_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P (K×s_o×R) = S_outᵀU_k, Q (K×R×s_i) = V_kS_in (zero-padded to the largest R), and
    the exact squared norms ‖U_kV_k‖² (float64, CPU).

    ``deltas`` may be a generator: clients are consumed in chunks of PROJECT_CHUNK (one
    GEMM per chunk) and dropped, so only the small sketched factors of all K are kept.
    """
    ps: list[torch.Tensor] = []
    qs: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    chunk: list[LowRankDelta] = []

    def flush() -> None:
        ranks = [d.u.shape[1] for d in chunk]
        u = torch.cat([d.u for d in chunk], dim=1)
        v = torch.cat([d.v for d in chunk], dim=0)
        # clone: a view would keep the whole chunk's product alive
        ps.extend(p.clone() for p in (u if s_out is None else s_out.T @ u).split(ranks, dim=1))
        qs.extend(q.clone() for q in (v if s_in is None else v @ s_in).split(ranks, dim=0))
        norms.append(exact_sq_norms(chunk))
        chunk.clear()

    for delta in deltas:
        chunk.append(delta)
        if len(chunk) == PROJECT_CHUNK:
            flush()
    if chunk:
        flush()
    r_max = max(p.shape[1] for p in ps)
    return _stack_padded(ps, 1, r_max), _stack_padded(qs, 0, r_max), torch.cat(norms)


def exact_sq_norms(deltas: Sequence[LowRankDelta]) -> torch.Tensor:
    """‖U_k V_k‖²_F = Σ (U_kᵀU_k) ⊙ (V_kV_kᵀ), exactly, for each k (float64, CPU)."""
    values = [((d.u.T @ d.u) * (d.v @ d.v.T)).sum() for d in deltas]
    return torch.stack(values).to(device=CPU, dtype=torch.float64)


def sketched_gram(p: torch.Tensor, q: torch.Tensor, *, chunk_bytes: int = CHUNK_BYTES
                  ) -> torch.Tensor:
    """K×K Gram of the sketches M_k = P_k Q_k, in client chunks (float64, CPU).

    Only one pair of chunks of s×s sketches is materialised at a time, so memory stays
    O(chunk·s²) whatever K.
    """
    k = p.shape[0]
    cells = p.shape[1] * q.shape[2]
    chunk = max(1, min(k, chunk_bytes // max(1, cells * p.element_size())))
    gram = torch.empty(k, k, dtype=torch.float64)
    starts = list(range(0, k, chunk))

    def flat(start: int) -> torch.Tensor:
        stop = min(start + chunk, k)
        return torch.bmm(p[start:stop], q[start:stop]).reshape(stop - start, cells)

    for i, a in enumerate(starts):
        fa = flat(a)
        for b in starts[: i + 1]:
            fb = fa if b == a else flat(b)
            block = (fa @ fb.T).to(device=CPU, dtype=torch.float64)
            if b == a:
                block = (block + block.T) / 2
            gram[a:a + fa.shape[0], b:b + fb.shape[0]] = block
            gram[b:b + fb.shape[0], a:a + fa.shape[0]] = block.T
    return gram


def sketch_module_gram(deltas: Iterable[LowRankDelta], module: str, spec: SketchSpec
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's sketched K×K Gram and its exact squared norms (float64, CPU).

    The maths runs where the factors are (device and dtype of the deltas). ``deltas``
    may be a generator (see ``sketch_factors``): memory is then O(K·s·R), not O(K·d·R).
    """
    stream = iter(deltas)
    first = next(stream)
    s_out, s_in = module_projections(module, first.u.shape[0], first.v.shape[1], spec,
                                     dtype=first.u.dtype, device=first.u.device)
    chained = itertools.chain([first], stream)
    del first  # held by the chain only until its chunk is projected
    p, q, norms = sketch_factors(chained, s_out, s_in)
    return sketched_gram(p, q), norms


@dataclass
class SketchedSimilarityReport(SimilarityReport):
    """A SimilarityReport whose LoRA-module Grams are sketched.

    ``norms()`` stays exact (from ``sq_norms``), so the norm guard sees true norms.
    """

    spec: SketchSpec = field(default_factory=SketchSpec)
    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def norms(self) -> torch.Tensor:
        total = sum(self.sq_norms.values())
        return torch.as_tensor(total, dtype=torch.float64).clamp_min(0).sqrt()

    def subset(self, keep: list[int]) -> SketchedSimilarityReport:
        index = torch.tensor(keep, dtype=torch.long)
        return SketchedSimilarityReport(
            [self.clients[k] for k in keep],
            {m: g[index][:, index] for m, g in self.grams.items()},
            spec=self.spec, sq_norms={m: n[index] for m, n in self.sq_norms.items()})

    def to_json(self, *, modules: bool = False) -> dict:
        return {**super().to_json(modules=modules), "sketch": self.spec.to_json()}


def sketched_similarity(
    vectors: Sequence[TaskVector],
    spec: SketchSpec,
    *,
    include_dense: bool = True,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SketchedSimilarityReport:
    """Like ``compute_similarity`` (delta space), with sketched LoRA-module Grams.

    Streams module by module, and within a module client by client (in chunks): only
    the sketched factors of all K clients (K·2·s·R numbers) stay in memory, never one
    module's full factors for all K. A fixed ``spec.seed`` makes the result
    deterministic.
    """
    check_compatible(list(vectors))
    report = SketchedSimilarityReport(clients=[v.name for v in vectors], spec=spec)
    if not vectors:
        return report
    target = resolve_device(device) if device is not None else None
    names = list(vectors[0].lora_modules)
    if include_dense:
        names += vectors[0].dense_params
    for module in progress(names) if progress else names:
        # a generator: each client's factors are read, projected and dropped
        deltas = (delta_to(v.delta(module, "delta"), target, dtype) for v in vectors)
        if module in vectors[0].upload.dense:
            values = [d.value for d in deltas if isinstance(d, DenseDelta)]
            gram = dense_gram(values).to(device=CPU, dtype=torch.float64)
            report.grams[module] = gram
            report.sq_norms[module] = gram.diagonal().clone()
            continue
        report.grams[module], report.sq_norms[module] = sketch_module_gram(deltas, module, spec)
    return report


# -- the round's choice -----------------------------------------------------------------
def similarity_mode(strategy: Strategy, k: int) -> SimilarityMode:
    """"exact" or "sketch" for K clients: "auto" sketches from ``sketch_threshold`` on
    (delta space only; the paper-literal params space is always exact)."""
    mode = strategy.similarity_mode
    if mode == "auto":
        return ("sketch" if k >= strategy.sketch_threshold
                and strategy.similarity_space == "delta" else "exact")
    return mode


def round_similarity(
    vectors: Sequence[TaskVector],
    strategy: Strategy,
    *,
    seed_material: Sequence[object] = (),
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[SimilarityReport, dict]:
    """A round's similarity in the mode its strategy asks for, and what to record.

    Args:
        seed_material: identifies the round's inputs (clients and pinned commits); the
            sketch seed is derived from it when the strategy fixes none, so a resumed
            round draws the same projections.

    Returns:
        The report and ``{"mode": ...}`` (plus the sketch size, seed and kind).
    """
    mode = similarity_mode(strategy, len(vectors))
    if mode == "exact":
        report = compute_similarity(vectors, space=strategy.similarity_space,
                                    include_dense=strategy.include_dense_in_similarity,
                                    progress=progress, device=device, dtype=dtype)
        return report, {"mode": "exact"}
    if strategy.similarity_space != "delta":
        raise ConfigError("sketched similarity works in the delta space only.",
                          hint='Use similarity_mode "exact" with similarity_space "params".')
    seed = (strategy.sketch_seed if strategy.sketch_seed is not None
            else derive_seed("fedbip-sketch", *seed_material))
    spec = SketchSpec(size=strategy.sketch_size, seed=seed, kind=strategy.sketch_kind)
    report = sketched_similarity(vectors, spec,
                                 include_dense=strategy.include_dense_in_similarity,
                                 progress=progress, device=device, dtype=dtype)
    return report, spec.to_json()
