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
expected value from its own secret ``FEDBIP_WEBHOOK_SECRET``, which
``webhook_setup.create_webhook`` stores in the webhook's job secrets (encrypted by the
Hub, never in the command, the environment shown in the job spec, or our output). The two
are compared in constant time (``hmac.compare_digest``) before the payload is even
parsed; a missing or wrong secret starts no round and fails the job with the reason. Jobs
started without a payload (schedules, cron, by hand) need no secret: a round with nothing
new does nothing.

Triggers that arrive while a round runs coalesce into one follow-up round
(``fedbip_hub.scheduling.followups``); creating the Hub webhook itself is
``fedbip_hub.scheduling.webhook_setup``.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import asdict, dataclass
from typing import Any

from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.errors import ConfigError, FedbipError
from fedbip_hub.federation.repo import Federation
from fedbip_hub.scheduling.followups import JobOutcome, LogFn, run_with_followups

PAYLOAD_ENV = "WEBHOOK_PAYLOAD"
SECRET_ENV = "WEBHOOK_SECRET"  # set by the Hub in a webhook-triggered job
EXPECTED_SECRET_ENV = "FEDBIP_WEBHOOK_SECRET"  # the job's own secret (create_webhook)
MAIN_REF = "refs/heads/main"
_NULL_SHA = "0" * 40


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
