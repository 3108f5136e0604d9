"""Create, list and delete the Hub webhook that runs the server job when a member pushes.

What the job does with the event it is started with is ``fedbip_hub.scheduling.webhooks``.
"""

from __future__ import annotations

import shlex
from typing import Any

from fedbip_hub.errors import FedbipError
from fedbip_hub.federation.repo import Federation
from fedbip_hub.scheduling import jobs as scheduling
from fedbip_hub.scheduling.webhooks import EXPECTED_SECRET_ENV


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
