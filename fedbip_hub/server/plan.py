"""The round's plan: every input pinned to a commit before anything is written, committed
into ``state.json`` as the round's lease (``in_progress``), and the checks that this job
still holds that lease.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedbip_hub.adapters.metadata import describe_error
from fedbip_hub.errors import ConfigError, RoundInProgressError
from fedbip_hub.federation.config import FederationConfig, FederationState
from fedbip_hub.server.context import RoundContext


class PinnedInput(BaseModel):
    """One participant's task vector, pinned: upload commit and the start it came from."""

    model_config = ConfigDict(frozen=True)

    client: str
    repo_id: str
    commit: str
    upload_id: str
    start_revision: str | None = None
    n_examples: int = 1
    staleness: int = 0
    fresh: bool = True
    files: dict[str, str] = Field(default_factory=dict)

    def with_files(self, hashes: dict[tuple[str, str], dict[str, str]]) -> PinnedInput:
        """This input with the hashes of its upload files, when ``hashes`` (client,
        commit → file → sha256) has them."""
        files = hashes.get((self.client, self.commit))
        return self if files is None else self.model_copy(update={"files": files})


class RoundPlan(BaseModel):
    """Everything a round reads, pinned before it writes anything."""

    model_config = ConfigDict(frozen=True)

    plan_id: str
    round: int
    job_id: str
    started_at: str
    lease_until: str
    federation_revision: str
    inputs: dict[str, PinnedInput]
    latest: dict[str, str | None]
    skipped: dict[str, str] = Field(default_factory=dict)
    # client → why it starts over: its latest personalized revision is gone from its repo
    # (recreated, or its history squashed); its ``latest`` is None (the init) and its
    # history is reset when the round completes.
    restarted: dict[str, str] = Field(default_factory=dict)
    # client → its input, taken out of ``inputs`` because it made this round's maths fail
    # (its reason is in ``skipped``); recorded in the lease, so a resumed round never
    # replays it. A fresh one is refused when the round completes, a stale one evicted.
    dropped: dict[str, PinnedInput] = Field(default_factory=dict)
    # client → its last valid (consumed) upload, pinned beside a fresh one: if the gate
    # refuses the fresh one, this stands in for it, as for an upload refused while
    # planning (every refusal is treated alike; see skip_reasons.refusal_reason).
    fallbacks: dict[str, PinnedInput] = Field(default_factory=dict)
    # client → its repo's head as planning saw it, for each member planning looked at to
    # the end (no store error); the completed round records it as the client's
    # ``seen_head``, so the next round skips the member while its head stays there.
    heads: dict[str, str] = Field(default_factory=dict)
    # A settings change with no fresh upload replays this completed round under the new
    # settings (fedbip_hub.server.replay); its similarity memory is the one stored at
    # ``memory_revision`` (the revision that round started from), not the latest.
    replay_of: int | None = None
    memory_revision: str | None = None

    def lease_expired(self) -> bool:
        return datetime.fromisoformat(self.lease_until) < datetime.now(timezone.utc)

    def with_files(self, hashes: dict[tuple[str, str], dict[str, str]]) -> RoundPlan:
        """This plan with the hashes of the upload files read (see
        ``PinnedInput.with_files``) in its inputs and its fallbacks."""
        return self.model_copy(update={
            "inputs": {name: p.with_files(hashes) for name, p in self.inputs.items()},
            "fallbacks": {name: p.with_files(hashes) for name, p in self.fallbacks.items()}})

    def without(self, drops: dict[str, str]) -> RoundPlan:
        """This plan with the ``drops`` (client → why) moved from its inputs to its
        drops, their reasons in ``skipped``."""
        inputs, dropped = dict(self.inputs), dict(self.dropped)
        for name in drops:
            dropped[name] = inputs.pop(name)
        return self.model_copy(update={"inputs": inputs, "dropped": dropped,
                                       "skipped": {**self.skipped, **drops}})


def read_lease(raw: Any, address: str) -> RoundPlan:
    """state.json's ``in_progress`` as a RoundPlan; ConfigError (with the fix) when it is
    not one."""
    try:
        return RoundPlan.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"the round lease (in_progress in state.json) of {address} is invalid: "
            f"{describe_error(exc)}.",
            hint="Restore state.json from the federation repo's history: the version the "
            "last 'fedbip: round N started' (or 'resumed') commit wrote, whose round is "
            "then resumed; never edit the lease by hand.") from exc


def round_deadline(config: FederationConfig, current: float | None) -> float:
    """When a round stops waiting out rate limits: before its lease runs out (a job's
    --timeout is kept under the lease), leaving a tenth of it to finish."""
    deadline = time.monotonic() + 0.9 * 60.0 * config.lease_minutes
    return deadline if current is None else min(deadline, current)


def check_lease(ctx: RoundContext, plan: RoundPlan, state: FederationState | None = None
                ) -> str | None:
    """Stop (RoundInProgressError) unless this job still holds the plan's lease (in
    ``state``, default: the federation's state at its head). Returns the head it read
    (None when given ``state``)."""
    head = None
    if state is None:
        head = ctx.fed.head()
        state = ctx.fed.state(head)
    current = state.in_progress or {}
    if current.get("plan_id") != plan.plan_id:
        raise RoundInProgressError(
            f"round {plan.round} was completed or replaced by another job.",
            hint="Nothing to do; check `fedbip status`.")
    if current.get("job_id") != plan.job_id:
        raise RoundInProgressError(
            f"job {current.get('job_id')} took over round {plan.round} from this job "
            f"({plan.job_id}); stopping here, it finishes the round.",
            hint="Nothing to do; check `fedbip status`.")
    return head
