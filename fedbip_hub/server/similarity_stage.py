"""The similarity stage: the round's task-vector cosines (exact or sketched), refused
when not finite, and the similarity memory they are added to (the cosines the weights
then use).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedbip_hub.engine.compute import resolve_device, resolve_dtype
from fedbip_hub.engine.memory import MEMORY_FILE, SimilarityMemory, storage_granularity
from fedbip_hub.engine.similarity import CosineSource, SimilarityReport
from fedbip_hub.engine.sketch import round_similarity
from fedbip_hub.engine.strategies import Strategy
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import PinnedInput, RoundPlan


@dataclass(frozen=True)
class Similarity:
    """This round's cosines, and how they were computed (mode, sketch seed) for the
    record's ``compute`` section."""

    report: SimilarityReport
    info: dict | None


@dataclass(frozen=True)
class Remembered:
    """The new similarity memory (None: the strategy keeps none) and the cosines the
    weights use (the memory's view, or this round's report)."""

    memory: SimilarityMemory | None
    cosines: CosineSource


def similarity(ctx: RoundContext, strategy: Strategy, vectors: list[TaskVector],
               inputs: list[PinnedInput]) -> Similarity:
    """The cosines between the inputs' task vectors; ArithmeticError when not finite."""
    fresh = sum(p.fresh for p in inputs)
    ctx.log(f"Similarity between {len(vectors)} clients ({fresh} with new uploads).")

    def progress(items: Iterable[Any]) -> Iterable[Any]:
        return ctx.progress(items, "Similarity")

    report, info = round_similarity(
        vectors, strategy, seed_material=[f"{p.client}@{p.commit}" for p in inputs],
        device=resolve_device(ctx.device), dtype=resolve_dtype(strategy.compute_dtype),
        progress=progress)
    require_finite(report)
    return Similarity(report, info)


def require_finite(report: SimilarityReport) -> None:
    """Refuse to weigh anyone with a non-finite Gram matrix or norm: a NaN cosine is read
    as "no similarity", and every update would silently be lost."""
    bad = sorted(m for m, g in report.grams.items() if not bool(torch.isfinite(g).all()))
    if not bool(torch.isfinite(report.norms()).all()):
        bad.append("the norms")
    if bad:
        raise ArithmeticError(f"non-finite task-vector inner products in {bad[:3]}")


def stored_memory(ctx: RoundContext, plan: RoundPlan, strategy: Strategy
                  ) -> SimilarityMemory:
    """The memory at the plan's pinned revision (a replay's: the one the round it replays
    started from), empty when there is none, read once by the preflight for the whole
    round (memories are never mutated)."""
    keyed = storage_granularity(strategy.effective_granularity or "layer")
    memory = SimilarityMemory(granularity=keyed)
    revision = plan.memory_revision or plan.federation_revision
    if ctx.store.file_exists(ctx.fed.repo_id, MEMORY_FILE, revision):
        memory = SimilarityMemory.from_bytes(
            ctx.store.read_bytes(ctx.fed.repo_id, MEMORY_FILE, revision),
            granularity=keyed)
    return memory


def remember(plan: RoundPlan, strategy: Strategy, report: SimilarityReport,
             inputs: list[PinnedInput], scale: torch.Tensor, *,
             stored: SimilarityMemory | None, evicted: Iterable[str]) -> Remembered:
    """This round's evidence added to the federation's similarity memory (``stored``,
    read at the plan's pinned revision, so a resumed round computes the same); returns
    the new memory (written when the round completes) and the cosines the weights use."""
    if strategy.similarity_memory == 0:
        return Remembered(None, report)
    assert stored is not None  # the preflight reads it whenever the strategy keeps one
    # A client that starts over (its repo was recreated) starts with no evidence too.
    # So does a client whose consumed update left the pool, and any client whose
    # stored evidence is not finite (remembered before the per-client bounds).
    leaving = {*plan.restarted, *evicted, *stored.nonfinite_clients()}
    memory = stored.without(leaving).updated(report, [p.fresh for p in inputs],
                                             decay=strategy.similarity_memory, scale=scale)
    return Remembered(memory, memory.view(report))
