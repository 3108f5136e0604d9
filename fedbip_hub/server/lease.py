"""Stage 1, plan: make a new plan (or resume the one in the lease), check it against the
federation's own configuration, and take the lease with one commit on the head it read.

Exclusivity: taking the lease (a new plan, or a takeover of a dead job's plan) is a commit
with the head it read as parent, so of concurrent jobs exactly one holds it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine.compute import resolve_device
from fedbip_hub.engine.memory import SimilarityMemory
from fedbip_hub.engine.strategies import oracle_groups
from fedbip_hub.errors import ConfigError, ConflictError, RoundInProgressError, StoreError
from fedbip_hub.federation.config import (
    INIT_DIR,
    STATE_FILE,
    FederationConfig,
    FederationState,
    dump_json,
)
from fedbip_hub.federation.settings import changed_settings, merge_settings
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import RoundPlan, read_lease, round_deadline
from fedbip_hub.server.replay import replay_last_round
from fedbip_hub.server.scan import scan_members, waiting_reason, waits
from fedbip_hub.server.similarity_stage import stored_memory


@dataclass(frozen=True)
class Proposal:
    """``plan_or_resume``'s answer: the plan (None: nothing new since the last round),
    whether it resumes another job's plan, and planning's skips."""

    plan: RoundPlan | None
    resumed: bool = False
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Planned:
    """The plan this job holds the lease of (in a dry run: the plan, no lease)."""

    plan: RoundPlan
    config: FederationConfig
    resumed: bool  # this job resumes a plan another job made (it may have published)
    fed_head: str | None  # the federation head this job last saw holding its lease
    memory: SimilarityMemory | None  # the stored similarity memory (None: not used)
    # setting → [before, now]: the merge settings that changed since the last completed
    # round (fedbip_hub.federation.settings); the round then re-merges every input.
    settings_changed: dict[str, list] = field(default_factory=dict)


@dataclass(frozen=True)
class NothingNew:
    """No member brought anything new: the round writes nothing."""

    round: int
    skipped: dict[str, str]


def take_lease(ctx: RoundContext) -> Planned | NothingNew:
    """Plan (or resume) the round and commit its lease; planning again when the
    federation repo moved meanwhile."""
    resolve_device(ctx.device)  # a bad --device fails before any lease is taken
    first_holder: str | None = None  # the lease holder this job first found
    resumed = False  # once a plan was resumed, a replan this job makes is treated alike
    for attempt in range(5):
        head = ctx.fed.head()
        config = ctx.fed.config(head)
        state = ctx.fed.state(head)
        if attempt == 0:  # 429s are waited out only while the lease would still hold
            ctx.store.deadline = round_deadline(config, ctx.store.deadline)
        if attempt == 0 and state.in_progress is not None:
            first_holder = str(state.in_progress.get("job_id"))
        changes = settings_changes(config, state)
        proposal = plan_or_resume(ctx, head, config, state, first_holder=first_holder,
                                  settings_changed=bool(changes))
        plan, resumed = proposal.plan, resumed or proposal.resumed
        if plan is None:
            ctx.log("Nothing new since the last round: no commit.")
            return NothingNew(state.round, proposal.skipped)
        memory = preflight(ctx, config, plan)
        if ctx.dry_run:
            return Planned(plan, config, resumed, None, memory, changes)
        # Planning a round and resuming one both commit the lease with the head as
        # parent: of concurrent jobs (takeovers included) exactly one wins it.
        verb = "started" if state.in_progress is None else "resumed"
        state.in_progress = plan.model_dump(mode="json")
        try:
            fed_head = ctx.store.commit(
                ctx.fed.repo_id, {STATE_FILE: dump_json(state)},
                message=f"fedbip: round {plan.round} {verb}", parent=head)
            return Planned(plan, config, resumed, fed_head, memory, changes)
        except ConflictError:
            ctx.log("The federation repo moved while planning; planning again.")
    raise StoreError("the federation repo kept moving while planning the round.",
                     hint="Retry in a moment.")


def settings_changes(config: FederationConfig, state: FederationState
                     ) -> dict[str, list]:
    """The merge settings changed since the last completed round recorded them (empty:
    none, or none recorded yet). Read from the config and state already at hand: an idle
    round costs no call more. A strategy that does not validate changes nothing here; a
    round with news reports it (``preflight``)."""
    try:
        return changed_settings(state.merge_settings, merge_settings(config))
    except ConfigError:
        return {}


def preflight(ctx: RoundContext, config: FederationConfig, plan: RoundPlan
              ) -> SimilarityMemory | None:
    """Every check that can fail on the federation's own configuration or files (the
    strategy, the oracle's groups, the initial adapter, the similarity memory), run
    before the lease is taken: a round never takes a lease it is bound to abandon.
    Returns the stored similarity memory it read (None when the strategy keeps none)."""
    strategy = config.strategy_obj()
    if strategy.spec.weighting == "oracle":
        oracle_groups(strategy, list(plan.inputs), ctx.groups)
    LoraAdapter(ctx.store.fetch_folder(ctx.fed.repo_id, plan.federation_revision,
                                       INIT_DIR), label="federation init")
    if strategy.similarity_memory != 0:
        return stored_memory(ctx, plan, strategy)
    return None


def plan_or_resume(ctx: RoundContext, head: str, config: FederationConfig,
                   state: FederationState, *, first_holder: str | None = None,
                   settings_changed: bool = False) -> Proposal:
    """The lease's plan when it may be taken over (its lease expired, or --takeover of
    the job first found), a new plan when members brought news or the merge settings
    changed (every member with an input is then re-merged), else no plan."""
    ctx.fed.check_not_rolled_back(head, state)
    if state.in_progress is not None:
        plan = read_lease(state.in_progress, ctx.fed.address)
        # --takeover vouches only for the job it found: a lease that another job has
        # claimed since (a concurrent takeover, or a new round) is that job's.
        takeover = ctx.takeover and plan.job_id == first_holder
        if not (plan.lease_expired() or takeover):
            raise RoundInProgressError(
                f"round {plan.round} is in progress (job {plan.job_id}, started "
                f"{plan.started_at}, lease until {plan.lease_until}).",
                hint="Wait for it to finish. If that job died, rerun with --takeover "
                "(or wait for the lease to expire) to resume the same round.")
        ctx.log(f"Resuming round {plan.round} (plan {plan.plan_id[:8]}, taking the "
                f"lease over from job {plan.job_id}).")
        now = datetime.now(timezone.utc)
        return Proposal(plan.model_copy(update={
            "job_id": uuid.uuid4().hex[:12],
            "lease_until": (now + timedelta(minutes=config.lease_minutes)).isoformat(
                timespec="seconds")}), resumed=True)
    membership = ctx.fed.membership(head)
    scan = scan_members(ctx, membership.members, state)
    inputs, skipped = scan.inputs, scan.skipped
    skipped.update(membership.problems)  # broken members/*.json: file → why
    waiting = {name for name, pinned in inputs.items()
               if pinned.fresh and waits(state.client(name), pinned)}
    news = any(p.fresh for name, p in inputs.items() if name not in waiting)
    if not news and not (settings_changed and inputs):
        for name in waiting:
            skipped[name] = waiting_reason(state.client(name).internal_error_round)
        return Proposal(None, skipped=skipped)
    latest = {name: None if name in scan.restarted else
              (state.client(name).personalized_history or [None])[-1]
              for name in inputs}
    replay = None
    if not news and not waiting:  # settings changed, nothing fresh: replay the last round
        replay = replay_last_round(ctx, head, state, scan)
        inputs, latest = replay.inputs, replay.latest
    now = datetime.now(timezone.utc)
    return Proposal(RoundPlan(
        plan_id=uuid.uuid4().hex, round=state.round + 1, job_id=uuid.uuid4().hex[:12],
        started_at=now.isoformat(timespec="seconds"),
        lease_until=(now + timedelta(minutes=config.lease_minutes)).isoformat(
            timespec="seconds"),
        federation_revision=head, inputs=inputs, latest=latest, skipped=skipped,
        restarted=scan.restarted, fallbacks=scan.fallbacks, heads=scan.heads,
        replay_of=replay.round if replay else None,
        memory_revision=replay.memory_revision if replay else None), skipped=skipped)
