"""Run rounds when members push: a Hub webhook starts the server job, which must react to
client uploads only, and coalesce the triggers that arrive while a round is running.

**The filter.** A Hub webhook that runs a Job passes the event in ``WEBHOOK_PAYLOAD``
(huggingface_hub's ``WebhookPayload``: the repo, the event scope, the refs it moved). The
job runs a round only for a push to the main branch of a member repo that changed
``fedbip_upload.json``: every ``fedbip push`` writes it (with a fresh nonce), and the
server writes only under ``personalized/``. So the server's own pushes, the federation
repo's bookkeeping, discussions, other branches and unknown repos start no round, and the
job exits 0 at once. (The payload carries no file list: the job compares the upload
metadata at the ref's old and new commits, two small reads.)

**The secret.** Anyone who can start the job can set ``WEBHOOK_PAYLOAD``, so a payload
is acted on only with the webhook's secret. A webhook-triggered HF Job receives that
secret from the Hub in ``WEBHOOK_SECRET`` (beside ``WEBHOOK_PAYLOAD``; a URL webhook
would get it verbatim in the ``X-Webhook-Secret`` header, no HMAC). The job knows the
expected value from its own secret ``FEDBIP_WEBHOOK_SECRET``, which ``create_webhook``
stores in the webhook's job secrets (encrypted by the Hub, never in the command, the
environment shown in the job spec, or our output). The two are compared in constant time
(``hmac.compare_digest``) before the payload is even parsed; a missing or wrong secret
starts no round and fails the job with the reason. Jobs started without a payload
(schedules, cron, by hand) need no secret: a round with nothing new does nothing.

**Coalescing.** A triggered job that finds a round in progress writes a marker,
``triggers/pending.json``, into the federation repo, with ``parent`` set to a head whose
state shows the round in progress (so the marker lands before the round's final commit),
and exits 0. More triggers update the same marker. The job that runs a round checks for
the marker afterwards (``run_with_followups``): it deletes it, then runs one follow-up
round, which picks up every upload that arrived meanwhile; the loop is bounded. If the
round ended between the check and the marker, the triggered job runs the round itself.
"""

from __future__ import annotations

import hmac
import json
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.errors import ConfigError, ConflictError, FedbipError, RoundInProgressError
from fedbip_hub.federation.config import dump_json, utc_now
from fedbip_hub.federation.repo import Federation
from fedbip_hub.scheduling import jobs as scheduling

PAYLOAD_ENV = "WEBHOOK_PAYLOAD"
SECRET_ENV = "WEBHOOK_SECRET"  # set by the Hub in a webhook-triggered job
EXPECTED_SECRET_ENV = "FEDBIP_WEBHOOK_SECRET"  # the job's own secret (create_webhook)
PENDING_FILE = "triggers/pending.json"
MAIN_REF = "refs/heads/main"
MAX_FOLLOWUPS = 3
_NULL_SHA = "0" * 40
_WRITE_TRIES = 8
_MAX_KEPT_TRIGGERS = 20

LogFn = Callable[[str], None]
RoundFn = Callable[..., dict]


@dataclass
class Trigger:
    """What a webhook event asks of the server job.

    ``run`` is True only for a client upload; ``reason`` says why, for the job's log.
    """

    run: bool
    reason: str
    scope: str | None = None
    repo_id: str | None = None
    client: str | None = None
    commit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_payload(raw: str) -> Any:
    """A ``WEBHOOK_PAYLOAD`` as huggingface_hub's ``WebhookPayload`` (raises ValueError)."""
    from huggingface_hub import WebhookPayload

    return WebhookPayload.model_validate_json(raw)


def classify(fed: Federation, raw_payload: str) -> Trigger:
    """Decide whether a webhook event is a client upload (see the module docstring)."""
    try:
        payload = parse_payload(raw_payload)
    except ValueError as exc:
        return Trigger(False, f"unreadable {PAYLOAD_ENV} ({str(exc).splitlines()[0]})")
    scope = payload.event.scope
    repo_id = payload.repo.name
    base = {"scope": scope, "repo_id": repo_id}
    if scope != "repo.content" or payload.event.action == "delete":
        return Trigger(False, f"not a push ({payload.event.action} {scope})", **base)
    if repo_id == fed.repo_id:
        return Trigger(False, "the federation repo changed (the server's own bookkeeping)",
                       **base)
    members = {m.repo_id: m.name for m in fed.members().values()}
    client = members.get(repo_id)
    if payload.repo.type != "model" or client is None:
        return Trigger(False, f"{payload.repo.type} repo {repo_id} is not a member repo",
                       **base)
    base["client"] = client
    old, new = _moved_main(payload)
    if new is None:
        if payload.updatedRefs:
            return Trigger(False, "the push did not move main", **base)
        return Trigger(True, "the event names no commit; running the round to be safe",
                       **base)
    base["commit"] = new
    try:
        if old is None:
            old = _parent_on_main(fed, repo_id, new)
        changed = _upload_marker(fed, repo_id, new) != _upload_marker(fed, repo_id, old)
    except FedbipError as exc:  # a round is idempotent: when in doubt, run it
        return Trigger(True, f"could not inspect commit {new[:8]} ({exc.message}); running "
                       "the round to be safe", **base)
    if not changed:
        return Trigger(False, f"the commit did not change {UPLOAD_METADATA_NAME} "
                       "(not a client upload: e.g. the server's personalized/ push)", **base)
    return Trigger(True, f"{client} pushed a new upload", **base)


def _moved_main(payload: Any) -> tuple[str | None, str | None]:
    refs = payload.updatedRefs
    if refs:
        for ref in refs:
            if ref.ref in (MAIN_REF, "main"):
                old = ref.oldSha if ref.oldSha and ref.oldSha != _NULL_SHA else None
                new = ref.newSha if ref.newSha and ref.newSha != _NULL_SHA else None
                return old, new
        return None, None
    return None, payload.repo.head_sha


def _parent_on_main(fed: Federation, repo_id: str, commit: str) -> str | None:
    ids = [c.id for c in fed.store.history(repo_id)]
    later = ids[ids.index(commit) + 1:] if commit in ids else []
    return later[0] if later else None


def _upload_marker(fed: Federation, repo_id: str, revision: str | None) -> bytes | None:
    if revision is None:
        return None
    if not fed.store.file_exists(repo_id, UPLOAD_METADATA_NAME, revision):
        return None
    return fed.store.read_bytes(repo_id, UPLOAD_METADATA_NAME, revision)


# -- coalescing -------------------------------------------------------------------------
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


def verify_secret(secret: str | None, expected: str | None) -> None:
    """Accept a webhook start only with the webhook's secret (see the module docstring).

    Raises:
        ConfigError: the job has no expected secret (FEDBIP_WEBHOOK_SECRET) to check with.
        FedbipError: the secret is missing or wrong: a forged or misrouted start.
    """
    if not expected:
        raise ConfigError(
            f"a webhook start ({PAYLOAD_ENV} is set), but this job has no "
            f"{EXPECTED_SECRET_ENV} to check the webhook's secret with: no round started.",
            hint="Run `fedbip-server webhook create FED` again: it stores the webhook's secret as "
            f"the job secret {EXPECTED_SECRET_ENV}.")
    if not hmac.compare_digest((secret or "").encode(), expected.encode()):
        raise FedbipError(
            f"the webhook secret ({SECRET_ENV}) is {'wrong' if secret else 'missing'}: "
            f"{PAYLOAD_ENV} not trusted, no round started.",
            hint="If your own webhook started this job, run `fedbip-server webhook create FED` "
            "again to bring its secret and the job's in line; otherwise someone started "
            "the job with a forged payload.")


def run_job(fed: Federation, *, payload: str | None = None, secret: str | None = None,
            expected_secret: str | None = None, log: LogFn | None = None,
            **options: Any) -> JobOutcome:
    """What ``fedbip-server run`` does: check and filter a webhook start, then run with
    follow-ups.

    Args:
        payload: ``WEBHOOK_PAYLOAD`` (None or empty: not a webhook start).
        secret: ``WEBHOOK_SECRET``, what the Hub passed with the payload.
        expected_secret: ``FEDBIP_WEBHOOK_SECRET``, the job's own copy of it.
    """
    log = log or (lambda _msg: None)
    trigger = None
    if payload:
        verify_secret(secret, expected_secret)
        trigger = classify(fed, payload)
        if not trigger.run:
            log(f"Webhook trigger ignored: {trigger.reason}.")
            return JobOutcome("ignored", trigger=trigger, message=trigger.reason)
        log(f"Webhook trigger: {trigger.reason}.")
    return run_with_followups(fed, trigger=trigger, log=log, **options)


def payload_from_env() -> str | None:
    return os.environ.get(PAYLOAD_ENV) or None


def webhook_from_env() -> dict[str, str | None]:
    """``run_job``'s payload, secret and expected secret, from the job's environment."""
    return {"payload": payload_from_env(), "secret": os.environ.get(SECRET_ENV) or None,
            "expected_secret": os.environ.get(EXPECTED_SECRET_ENV) or None}


# -- creating the webhook ---------------------------------------------------------------
def create_webhook(fed_address: str, *, job_id: str | None = None, secret: str | None = None,
                   options: scheduling.JobOptions | None = None, token: str | None = None,
                   job_token: str | None = None) -> dict[str, Any]:
    """Create (or update) the Hub webhook that runs the server job when a member repo changes.

    It watches every member repo (domain "repo"); re-run it after members join. The job it
    runs is ``job_id`` if given; else the last run of the federation's scheduled job; else
    a source job started now with the same spec as ``fedbip-server schedule`` (it runs one
    round, harmless: a round with nothing new makes no commit). The job's token goes in
    the webhook's ``secrets`` (a webhook does not copy its source job's secrets).
    """
    import secrets as secrets_module

    scheduling.check_hub_federation(fed_address)
    options = options or scheduling.JobOptions()
    token = scheduling.resolve_token(token)
    job_token = job_token or token
    fed = Federation.at(fed_address, token=token)
    members = fed.members()
    if not members:
        raise FedbipError(f"{fed_address} has no members yet: nothing to watch.",
                          hint="Create the webhook after members join (and again whenever "
                          "one joins).")
    watched = [{"type": "model", "name": m.repo_id} for m in members.values()]
    api = scheduling._api(token)
    source = "given"
    if job_id is None:
        job_id, source = _source_job(fed_address, options, token, job_token, api)
    existing = [w for w in scheduling.hub_call("list webhooks", api.list_webhooks)
                if _runs_server_job(w, fed_address)]
    hook = existing[0] if existing else None
    # The job checks the secret the Hub hands it against its own copy (verify_secret).
    signing = secret or (hook.secret if hook is not None else None) or \
        secrets_module.token_hex(16)
    job_secrets = {scheduling.SECRET_NAME: job_token, EXPECTED_SECRET_ENV: signing}
    if hook is not None:
        hook_id = hook.id
        info = scheduling.hub_call("update the webhook", lambda: api.update_webhook(
            hook_id, job_id=job_id, watched=watched, domains=["repo"], secret=signing,
            secrets=job_secrets))
        action = "updated"
    else:
        info = scheduling.hub_call("create the webhook", lambda: api.create_webhook(
            job_id=job_id, watched=watched, domains=["repo"], secret=signing,
            secrets=job_secrets))
        action = "created"
    return {**summarize_webhook(info), "action": action, "job_source": source,
            "job_id": job_id}


def _source_job(fed_address: str, options: scheduling.JobOptions, token: str, job_token: str,
                api: Any) -> tuple[str, str]:
    schedules = scheduling.list_schedules(fed_address, namespace=options.namespace,
                                          token=token)
    for entry in schedules:
        if entry.get("last_run"):
            return entry["last_run"]["id"], f"last run of scheduled job {entry['id']}"
    spec = scheduling.job_spec(fed_address, options, job_token)
    job = scheduling.hub_call("start the source job", lambda: api.run_job(**spec))
    return job.id, "started now (it runs one round)"


def _runs_server_job(info: Any, fed_address: str | None = None) -> bool:
    """Whether a webhook runs the fedbip server job (of ``fed_address`` when given): by the
    job's labels, or, should the Hub not echo them, by its command."""
    job = info.job
    if job is None:
        return False
    labels = job.labels or {}
    command = " ".join(job.command or [])
    if fed_address is None:
        return scheduling.ROLE_LABELS.items() <= labels.items() or (
            "fedbip-server run" in command)
    return labels.get(scheduling.FEDERATION_LABEL) == scheduling.federation_slug(
        fed_address) or f"fedbip-server run {shlex.quote(fed_address)}" in command


def summarize_webhook(info: Any) -> dict[str, Any]:
    """A WebhookInfo as JSON-ready data, without its signing secret or job secrets."""
    job = info.job
    return {
        "id": info.id,
        "watched": [{"type": w.type, "name": w.name} for w in info.watched],
        "domains": list(info.domains or []),
        "disabled": bool(info.disabled),
        "command": list(job.command or []) if job else None,
        "image": job.docker_image if job else None,
        "secrets": sorted(job.secrets or []) if job else [],
        "federation": (job.labels or {}).get(scheduling.FEDERATION_LABEL) if job else None,
    }


def list_webhooks(*, token: str | None = None) -> list[dict[str, Any]]:
    """The token owner's webhooks that run a fedbip server job."""
    api = scheduling._api(scheduling.resolve_token(token))
    return [summarize_webhook(w) for w in scheduling.hub_call("list webhooks", api.list_webhooks)
            if _runs_server_job(w)]


def delete_webhook(webhook_id: str, *, token: str | None = None) -> dict[str, Any]:
    api = scheduling._api(scheduling.resolve_token(token))
    scheduling.hub_call(f"delete webhook {webhook_id}", lambda: api.delete_webhook(webhook_id))
    return {"id": webhook_id, "deleted": True}
