"""The guards stage: near-identical uploads (counted once), norm outliers (clipped or
excluded) and sign flippers (shared with no one), each judged on this round's cosines
and norms. The verdicts are the engine's (``engine.robust``); this stage applies them to
the round's inputs and says why in the log and the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbip_hub.engine.robust import DuplicateGroups, find_duplicates, norm_guard, sign_guard
from fedbip_hub.engine.similarity import CosineSource, SimilarityReport
from fedbip_hub.engine.strategies import Strategy
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import PinnedInput


@dataclass(frozen=True)
class Screened:
    """The inputs after the norm guard: those kept (with their cosines and vectors), the
    scale of each (below 1: clipped), the guard's details per flagged client, and the
    clients it excluded (client → why, and client → refused upload id)."""

    report: SimilarityReport
    vectors: list[TaskVector]
    inputs: list[PinnedInput]
    scale: torch.Tensor
    details: dict[str, dict]
    excluded: dict[str, str]
    refused: dict[str, str]


def duplicates(ctx: RoundContext, strategy: Strategy, report: SimilarityReport,
               inputs: list[PinnedInput]) -> DuplicateGroups | None:
    """Near-identical task vectors of different members (this round's cosines)."""
    if strategy.duplicate_cosine is None:
        return None
    copies = find_duplicates(report.model_cosine(), report.norms(),
                             fresh=[p.fresh for p in inputs],
                             min_cosine=strategy.duplicate_cosine,
                             norm_tolerance=strategy.duplicate_norm_tolerance)
    for group, kept in zip(copies.groups, copies.kept, strict=True):
        ctx.log(f"Duplicates: {', '.join(inputs[i].client for i in group)} uploaded "
                f"near-identical updates; only {inputs[kept].client}'s is weighted.")
    return copies


def screen_norms(ctx: RoundContext, strategy: Strategy, report: SimilarityReport,
                 vectors: list[TaskVector], inputs: list[PinnedInput],
                 copies: DuplicateGroups | None = None) -> Screened:
    """Clip (scale down) or exclude fresh updates whose norm is a robust outlier. A
    set of copies counts once in the statistics, and its copies share its kept
    member's verdict."""
    scale = torch.ones(len(inputs), dtype=torch.float64)
    if strategy.norm_guard == "off":
        return Screened(report, vectors, inputs, scale, {}, {}, {})
    norms = report.norms()
    result = norm_guard(copies.without_copies(norms) if copies is not None else norms,
                        threshold=strategy.norm_guard_threshold)

    def judged(k: int) -> int:  # whose verdict applies to input k
        kept = copies.kept_for(k) if copies is not None else None
        return k if kept is None else kept

    flagged = [k for k in range(len(inputs))
               if judged(k) in result.outliers and inputs[k].fresh]
    details = {inputs[k].client: {"norm": float(norms[k]),
                                  "robust_z": float(result.robust_z[judged(k)]),
                                  "cap": result.cap, "action": strategy.norm_guard}
               for k in flagged}
    for k in flagged:
        ctx.log(f"Norm guard ({strategy.norm_guard}): {inputs[k].client}: "
                f"{result.explain(judged(k))}.")
    if strategy.norm_guard == "clip":
        for k in flagged:
            scale[k] = result.scale[judged(k)]
        return Screened(report, vectors, inputs, scale, details, {}, {})
    excluded = {inputs[k].client: (
        f"{result.explain(judged(k))}; excluded by the norm guard (fix: check the training "
        "for divergence or a scaling bug, then push again)") for k in flagged}
    refused = {inputs[k].client: inputs[k].upload_id for k in flagged}
    keep = [k for k in range(len(inputs)) if k not in flagged]
    return Screened(report.subset(keep), [vectors[k] for k in keep],
                    [inputs[k] for k in keep], scale[keep], details, excluded, refused)


def screen_signs(ctx: RoundContext, strategy: Strategy, cosines: CosineSource,
                 inputs: list[PinnedInput], copies: DuplicateGroups | None = None
                 ) -> tuple[list[int], dict[str, dict]]:
    """Fresh updates that mirror a group of peers: shared with no one this round.
    Dropped copies (shared with no one anyway) neither oppose nor support anyone, so
    copies cannot outvote an honest update."""
    if strategy.sign_guard == "off":
        return [], {}
    names = [p.client for p in inputs]
    cosine = cosines.model_cosine()
    result = sign_guard(copies.without_copies(cosine) if copies is not None else cosine,
                        floor=strategy.sign_guard_floor,
                        min_opposed=strategy.sign_guard_min_peers)
    flagged = [k for k in result.flagged if inputs[k].fresh]
    details = {}
    for k in flagged:
        why = result.explain(k, names)
        ctx.log(f"Sign guard: {names[k]}: {why}; not shared with other clients.")
        details[names[k]] = {"reason": why, "opposes": [names[j] for j in
                                                           result.opposed[k]],
                             "action": "not shared with other clients this round"}
    return flagged, details
