"""Coalesce the webhook triggers that arrive while a round is running into follow-up rounds.

A triggered job that finds a round in progress writes a marker,
``triggers/pending.json``, into the federation repo, with ``parent`` set to a head whose
state shows the round in progress (so the marker lands before the round's final commit),
and exits 0. More triggers update the same marker. The job that runs a round checks for
the marker afterwards (``run_with_followups``): it deletes it, then runs one follow-up
round, which picks up every upload that arrived meanwhile; the loop is bounded. If the
round ended between the check and the marker, the triggered job runs the round itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedbip_hub.errors import ConflictError, RoundInProgressError
from fedbip_hub.federation.config import dump_json, utc_now
from fedbip_hub.federation.repo import Federation

if TYPE_CHECKING:
    from fedbip_hub.scheduling.webhooks import Trigger

PENDING_FILE = "triggers/pending.json"
MAX_FOLLOWUPS = 3
_WRITE_TRIES = 8
_MAX_KEPT_TRIGGERS = 20

LogFn = Callable[[str], None]
RoundFn = Callable[..., dict]


def read_pending(fed: Federation, revision: str | None = None) -> dict | None:
    """The pending-trigger marker at ``revision`` (default: head), if any."""
    revision = revision or fed.head()
    if not fed.store.file_exists(fed.repo_id, PENDING_FILE, revision):
        return None
    return json.loads(fed.store.read_bytes(fed.repo_id, PENDING_FILE, revision))


def request_followup(fed: Federation, trigger: Mapping[str, Any] | None = None, *,
                     log: LogFn | None = None) -> bool:
    """Leave a marker for the job that holds the round lease.

    Returns False, writing nothing, when no round is in progress any more (or its lease
    has expired): then nobody would see the marker and the caller should run the round.
    """
    from fedbip_hub.server.rounds import read_lease

    log = log or (lambda _msg: None)
    entry = {**(trigger or {}), "requested_at": utc_now()}
    for _ in range(_WRITE_TRIES):
        head = fed.head()
        state = fed.state(head)
        if state.in_progress is None or read_lease(state.in_progress,
                                                   fed.address).lease_expired():
            return False
        marker = read_pending(fed, head) or {"first_requested_at": entry["requested_at"],
                                             "count": 0, "triggers": []}
        marker["count"] = int(marker.get("count", 0)) + 1
        marker["last_requested_at"] = entry["requested_at"]
        marker["round_in_progress"] = state.in_progress.get("round")
        marker["triggers"] = [*marker.get("triggers", []), entry][-_MAX_KEPT_TRIGGERS:]
        try:
            fed.store.commit(fed.repo_id, {PENDING_FILE: dump_json(marker)},
                             message="fedbip: follow-up round requested", parent=head)
        except ConflictError:
            continue
        log(f"Round {marker['round_in_progress']} is in progress: left a follow-up request "
            f"({PENDING_FILE}, {marker['count']} pending).")
        return True
    raise ConflictError(f"{fed.address} kept moving; could not record the trigger.",
                        hint="The next scheduled run picks up the upload anyway.")


def take_pending(fed: Federation) -> dict | None:
    """Delete the marker (one commit) and return it; None when there is none.

    It is deleted before the follow-up round runs, so a trigger that arrives during that
    round leaves a new marker, and none is lost.
    """
    for _ in range(_WRITE_TRIES):
        head = fed.head()
        marker = read_pending(fed, head)
        if marker is None:
            return None
        try:
            fed.store.commit(fed.repo_id, {}, deletes=[PENDING_FILE], parent=head,
                             message="fedbip: follow-up round started")
        except ConflictError:
            continue
        return marker
    raise ConflictError(f"{fed.address} kept moving; could not take the follow-up request.",
                        hint="The next run takes it.")


@dataclass
class JobOutcome:
    """What one server job did: the rounds it ran (the first, then follow-ups), or why
    it ran none (``ignored``: not a client upload; ``deferred``: left to the running
    round's job)."""

    status: str
    records: list[dict] = field(default_factory=list)
    trigger: Trigger | None = None
    message: str | None = None
    pending: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """The first round's record (as ``fedbip-server run --json`` always printed it),
        plus ``followups``/``trigger`` when there are any."""
        if self.records:
            out: dict[str, Any] = dict(self.records[0])
            if len(self.records) > 1:
                out["followups"] = self.records[1:]
        else:
            out = {"status": self.status, "message": self.message}
        if self.trigger is not None:
            out["trigger"] = self.trigger.to_dict()
        if self.pending is not None:
            out["pending_trigger"] = self.pending
        return out


def run_with_followups(fed: Federation, *, trigger: Trigger | None = None,
                       max_followups: int = MAX_FOLLOWUPS, log: LogFn | None = None,
                       round_fn: RoundFn | None = None, **options: Any) -> JobOutcome:
    """Run a round, then one follow-up round per pending trigger (at most ``max_followups``).

    With a ``trigger`` (a webhook start), a round in progress elsewhere is not an error:
    the trigger is left as a marker for that round's job and the outcome is ``deferred``.
    Without one (schedule, cron, by hand) RoundInProgressError propagates as before.
    ``options`` go to ``run_round`` (follow-ups never take over a lease).
    """
    from fedbip_hub.server.rounds import run_round

    round_fn = round_fn or run_round
    log = log or (lambda _msg: None)
    dry_run = bool(options.get("dry_run"))
    outcome = JobOutcome("completed", trigger=trigger)
    try:
        outcome.records.append(round_fn(fed, log=log, **options))
    except RoundInProgressError as exc:
        if trigger is None or dry_run:
            raise
        record = _defer_or_run(fed, trigger.to_dict(), log, round_fn, exc, options)
        if record is None:
            outcome.status, outcome.message = "deferred", exc.message
            return outcome
        outcome.records.append(record)
    if dry_run:
        return outcome
    follow_options = {**options, "takeover": False}
    for _ in range(max(0, max_followups)):
        pending = take_pending(fed)
        if pending is None:
            return outcome
        log(f"{pending.get('count', 1)} trigger(s) arrived during the round: running a "
            "follow-up round.")
        try:
            outcome.records.append(round_fn(fed, log=log, **follow_options))
        except RoundInProgressError as exc:  # another job started a round meanwhile
            handoff = {"reason": "follow-up handed over", "from": pending}
            record = _defer_or_run(fed, handoff, log, round_fn, exc, follow_options)
            if record is None:
                return outcome
            outcome.records.append(record)
    outcome.pending = read_pending(fed)
    if outcome.pending is not None:
        log(f"Triggers are still pending after {max_followups} follow-up rounds; the next "
            "run takes them.")
    return outcome


def _defer_or_run(fed: Federation, trigger: dict, log: LogFn, round_fn: RoundFn,
                  exc: RoundInProgressError, options: dict) -> dict | None:
    """Leave a marker for the running round; if that round has just ended, run ourselves."""
    for _ in range(3):
        if request_followup(fed, trigger, log=log):
            return None
        try:
            return round_fn(fed, log=log, **options)
        except RoundInProgressError as again:
            exc = again
    raise exc
