"""Stages 3-6, the round's maths over the inputs that passed the gate: similarity →
guards (duplicates, norm guard) → similarity memory → sign guard → weights → merge.

Per-client isolation: when the maths fails, the clients that make it fail (each tried
alone, in memory) are dropped from the plan, the lease is committed without them (a
resumed round never reads them again), and the maths runs again over the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fedbip_hub.engine.memory import SimilarityMemory
from fedbip_hub.engine.robust import describe_duplicates
from fedbip_hub.engine.similarity import CosineSource, SimilarityReport
from fedbip_hub.engine.strategies import Strategy, WeightTable
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.errors import FedbipError, RoundInProgressError, StoreError
from fedbip_hub.federation.client import commit_with_retry
from fedbip_hub.federation.config import STATE_FILE, FederationConfig, dump_json
from fedbip_hub.federation.skip_reasons import exception_text, one_line, reason
from fedbip_hub.secrets import redact
from fedbip_hub.server.collect import Collected
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.guards import duplicates, screen_norms, screen_signs
from fedbip_hub.server.merge_stage import Merged, merge
from fedbip_hub.server.plan import PinnedInput, RoundPlan
from fedbip_hub.server.similarity_stage import remember, similarity
from fedbip_hub.server.weights import weigh


@dataclass(frozen=True)
class Computed:
    """The maths' results over the inputs used (in input order), and the skips and
    refusals as they stand after it. ``report`` is None when no input was fresh;
    ``weights``/``cosines`` when none was left fresh after the norm guard."""

    plan: RoundPlan  # without the clients dropped for failing the maths
    vectors: list[TaskVector]
    inputs: list[PinnedInput]
    skipped: dict[str, str]
    refused: dict[str, str]
    evicted: dict[str, str]
    report: SimilarityReport | None = None
    similarity_info: dict | None = None
    cosines: CosineSource | None = None  # what the weights used (memory view or report)
    memory: SimilarityMemory | None = None
    weights: WeightTable | None = None
    merged: Merged = field(default_factory=lambda: Merged([]))
    norm_guard: dict[str, dict] = field(default_factory=dict)
    sign_guard: dict[str, dict] = field(default_factory=dict)
    duplicates: list[dict] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [p.client for p in self.inputs]


def compute(ctx: RoundContext, strategy: Strategy, config: FederationConfig,
            collected: Collected, stored: SimilarityMemory | None, *,
            remerge: bool = False) -> Computed:
    """The maths, run again without the culprits until it passes (each pass drops at
    least one client); raises when the failure cannot be pinned on some clients.
    ``remerge``: the merge settings changed, every input is merged (fresh or not)."""
    plan, vectors, inputs = collected.plan, collected.vectors, collected.inputs
    skipped, refused = dict(collected.skipped), dict(collected.refused)
    evicted = dict(collected.evicted)
    while True:
        try:
            return _attempt(ctx, plan, strategy, config, collected, vectors, inputs,
                            skipped, refused, evicted, stored, remerge)
        except Exception as exc:
            drops = _culprits(ctx, exc, plan, strategy, config, collected, vectors, inputs)
            if not drops:
                raise
            plan = _drop_from_plan(ctx, plan, drops)
            for name, why in drops.items():
                skipped[name] = why
                if plan.dropped[name].fresh:
                    refused[name] = plan.dropped[name].upload_id
                else:
                    evicted[name] = why
            keep = [k for k, p in enumerate(inputs) if p.client not in drops]
            vectors, inputs = [vectors[k] for k in keep], [inputs[k] for k in keep]


def _attempt(ctx: RoundContext, plan: RoundPlan, strategy: Strategy,
             config: FederationConfig, collected: Collected, vectors: list[TaskVector],
             inputs: list[PinnedInput], skipped: dict[str, str], refused: dict[str, str],
             evicted: dict[str, str], stored: SimilarityMemory | None,
             remerge: bool = False) -> Computed:
    """Similarity, copies, guards, memory and merge over the clients that passed the
    gate (with no fresh one, only to re-merge under changed settings)."""
    skipped, refused = dict(skipped), dict(refused)
    if not inputs or not (remerge or any(p.fresh for p in inputs)):
        return Computed(plan, vectors, inputs, skipped, refused, evicted)
    cosine = similarity(ctx, strategy, vectors, inputs)
    # Copies first: the guards' statistics and the weights then count each set once.
    copies, before = duplicates(ctx, strategy, cosine.report, inputs), list(inputs)
    screened = screen_norms(ctx, strategy, cosine.report, vectors, inputs, copies)
    skipped.update(screened.excluded)
    refused.update(screened.refused)
    vectors, inputs = screened.vectors, screened.inputs
    if copies is not None:
        copies = copies.remap([p.client for p in before], [p.client for p in inputs])
    if not inputs or not (remerge or any(p.fresh for p in inputs)):
        return Computed(plan, vectors, inputs, skipped, refused, evicted, screened.report,
                        cosine.info, norm_guard=screened.details,
                        duplicates=(describe_duplicates(copies, [p.client for p in inputs])
                                    if copies is not None else []))
    remembered = remember(plan, strategy, screened.report, inputs, screened.scale,
                          stored=stored, evicted=evicted)
    blocked, signs = screen_signs(ctx, strategy, remembered.cosines, inputs, copies)
    weighed = weigh(plan, strategy, inputs, remembered.cosines, screened.scale, blocked,
                    copies, groups=ctx.groups, remerge=remerge)
    merged = merge(ctx, strategy, config, collected.init, vectors, inputs, weighed,
                   collected.latest_folders)
    try:
        described = (describe_duplicates(copies, [p.client for p in inputs])
                     if copies is not None else [])
    except BaseException:
        merged.close()
        raise
    return Computed(plan, vectors, inputs, skipped, refused, evicted, screened.report,
                    cosine.info, remembered.cosines, remembered.memory, weighed.weights,
                    merged, screened.details, signs, described)


def _culprits(ctx: RoundContext, exc: Exception, plan: RoundPlan, strategy: Strategy,
              config: FederationConfig, collected: Collected, vectors: list[TaskVector],
              inputs: list[PinnedInput]) -> dict[str, str]:
    """The clients that made the round's maths fail, each with its reason; empty when
    it cannot be pinned on some clients and not others (a server-side failure)."""
    names = [p.client for p in inputs]
    if isinstance(exc, FedbipError) and not isinstance(exc, StoreError) and (
            exc.client in names and len(names) > 1):
        return {exc.client: _dropped_reason(reason(exc))}
    ctx.log(f"The round's computation failed ({exception_text(exc)}); trying each "
            "client alone to find the input that causes it.")
    failures: dict[str, str] = {}
    in_memory = dataclasses.replace(ctx, streaming=False)  # probes stay in memory
    for k, pinned in enumerate(inputs):
        try:
            _probe(in_memory, plan, strategy, config, collected, vectors[k], pinned)
        except Exception as probe_exc:
            failures[pinned.client] = _dropped_reason(exception_text(probe_exc))
    return failures if len(failures) < len(inputs) else {}


def _probe(ctx: RoundContext, plan: RoundPlan, strategy: Strategy, config: FederationConfig,
           collected: Collected, vector: TaskVector, pinned: PinnedInput) -> None:
    """The round's maths for one client alone, as if it were fresh."""
    alone = pinned.model_copy(update={"fresh": True, "staleness": 0})
    cosine = similarity(ctx, strategy, [vector], [alone])
    weighed = weigh(plan, strategy, [alone], cosine.report,
                    torch.ones(1, dtype=torch.float64), [], groups=ctx.groups)
    merge(ctx, strategy, config, collected.init, [vector], [alone], weighed,
          collected.latest_folders)


def _drop_from_plan(ctx: RoundContext, plan: RoundPlan, drops: dict[str, str]
                    ) -> RoundPlan:
    """The plan with the clients moved from its inputs to its drops, its lease committed
    with them, so a resumed round never reads them again."""
    plan = plan.without(drops)
    for name, why in drops.items():
        ctx.log(f"{name}: {why}")
    if ctx.dry_run:
        return plan

    def build(head: str) -> dict:
        state = ctx.fed.state(head)
        lease = state.in_progress or {}
        if (lease.get("plan_id"), lease.get("job_id")) != (plan.plan_id, plan.job_id):
            raise RoundInProgressError(
                f"round {plan.round} was completed or taken over by another job.",
                hint="Nothing to do; check `fedbip status`.")
        state.in_progress = plan.model_dump(mode="json")
        return {STATE_FILE: dump_json(state)}

    commit_with_retry(ctx.fed, ctx.fed.repo_id, build,
                      f"fedbip: round {plan.round}: dropped {', '.join(sorted(drops))}")
    return plan


def _dropped_reason(why: str) -> str:
    return one_line(redact(
        f"its input made the round's computation fail ({why}); dropped from this round's "
        "plan, and its upload is not used (fix: check the adapter's values and scaling, "
        "then push a new upload)"))
