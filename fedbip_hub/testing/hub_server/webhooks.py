"""Webhooks as `HfApi` calls them (`create|list|get|update|enable|disable|delete_webhook`),
pointing at a URL or at a job; nothing is ever delivered, the server only stores them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from fedbip_hub.testing.hub_server.transport import (
    _HubError,
    _json_response,
    _Request,
    _Response,
)

_WATCH_TYPES = ("bucket", "dataset", "model", "org", "space", "user")


class Webhooks:
    """`HubServer`'s webhook routes and stored webhooks (job checks come from `Jobs`)."""

    _lock: threading.RLock
    _jobs: dict[str, dict[str, Any]]
    _scheduled: dict[str, dict[str, Any]]
    _webhooks: dict[str, dict[str, Any]]

    @property
    def webhooks(self) -> dict[str, dict[str, Any]]:
        """Webhooks by id: owner, watched, domains, secret, job source and job secrets."""
        with self._lock:
            return json.loads(json.dumps(self._webhooks))

    def _webhook_payload(self, hook: Mapping[str, Any]) -> dict[str, Any]:
        job = hook.get("job")
        return {
            "id": hook["id"],
            "watched": hook["watched"],
            "domains": hook["domains"],
            "secret": hook.get("secret"),
            "url": hook.get("url"),
            "job": self._public_spec(job, hook.get("secrets") or {}) if job else None,
            "disabled": hook["disabled"],
        }

    def _webhook_or_404(self, request: _Request, webhook_id: str) -> dict[str, Any]:
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to manage webhooks")
        with self._lock:
            hook = self._webhooks.get(webhook_id)
        if hook is None or hook["owner"] != caller.user:
            raise _HubError(404, f"Webhook not found: {webhook_id}")
        return hook

    def _apply_webhook_fields(
        self, request: _Request, hook: dict[str, Any], body: Mapping[str, Any]
    ) -> None:
        if "watched" in body:
            watched = body["watched"]
            if (
                not isinstance(watched, list)
                or not watched
                or not all(
                    isinstance(w, dict)
                    and w.get("type") in _WATCH_TYPES
                    and isinstance(w.get("name"), str)
                    and w["name"]
                    for w in watched
                )
            ):
                raise _HubError(400, "watched must be a non-empty list of {type, name}")
            hook["watched"] = [{"type": w["type"], "name": w["name"]} for w in watched]
        if "domains" in body:
            domains = body["domains"]
            if not isinstance(domains, list) or not set(domains) <= {"repo", "discussion"}:
                raise _HubError(400, "domains must be a list of 'repo' and 'discussion'")
            hook["domains"] = list(domains)
        if "secret" in body:
            hook["secret"] = body["secret"]
        if body.get("url") is not None and body.get("jobSourceId") is not None:
            raise _HubError(400, "Set url or jobSourceId, not both")
        if body.get("url") is not None:
            hook.update(url=str(body["url"]), jobSourceId=None, job=None, secrets={})
        if body.get("jobSourceId") is not None:
            source = str(body["jobSourceId"])
            with self._lock:
                found = self._jobs.get(source) or self._scheduled.get(source)
            if found is None:
                raise _HubError(404, f"Job not found: {source}")
            self._job_owner(request, found["namespace"])
            hook.update(
                url=None,
                jobSourceId=source,
                job={k: v for k, v in found["spec"].items() if k != "secrets"},
            )
        if "secrets" in body:
            secrets = body["secrets"]
            if not hook.get("jobSourceId"):
                raise _HubError(400, "secrets can only be set on a webhook that runs a job")
            if not isinstance(secrets, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
            ):
                raise _HubError(400, "secrets must map names to strings")
            hook["secrets"] = dict(secrets)

    def _create_webhook(self, request: _Request) -> _Response:
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to create a webhook")
        body = request.json()
        if not isinstance(body, dict) or "watched" not in body:
            raise _HubError(400, "A webhook needs watched items")
        if body.get("url") is None and body.get("jobSourceId") is None:
            raise _HubError(400, "A webhook needs a url or a jobSourceId")
        hook: dict[str, Any] = {
            "id": self._new_id("webhook"),
            "owner": caller.user,
            "watched": [],
            "domains": ["repo", "discussion"],
            "secret": None,
            "url": None,
            "jobSourceId": None,
            "job": None,
            "secrets": {},
            "disabled": False,
        }
        self._apply_webhook_fields(request, hook, body)
        with self._lock:
            self._webhooks[hook["id"]] = hook
        return _json_response({"webhook": self._webhook_payload(hook)})

    def _list_webhooks(self, request: _Request) -> _Response:
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to list webhooks")
        with self._lock:
            hooks = [h for h in self._webhooks.values() if h["owner"] == caller.user]
        return _json_response([self._webhook_payload(h) for h in hooks])

    def _get_webhook(self, request: _Request, webhook_id: str) -> _Response:
        return _json_response(
            {"webhook": self._webhook_payload(self._webhook_or_404(request, webhook_id))}
        )

    def _update_webhook(self, request: _Request, webhook_id: str) -> _Response:
        hook = self._webhook_or_404(request, webhook_id)
        body = request.json()
        if not isinstance(body, dict):
            raise _HubError(400, "The body must be a JSON object")
        updated = json.loads(json.dumps(hook))
        self._apply_webhook_fields(request, updated, body)
        with self._lock:
            self._webhooks[webhook_id] = updated
        return _json_response({"webhook": self._webhook_payload(updated)})

    def _toggle_webhook(self, request: _Request, webhook_id: str, action: str) -> _Response:
        hook = self._webhook_or_404(request, webhook_id)
        with self._lock:
            hook["disabled"] = action == "disable"
        return _json_response({"webhook": self._webhook_payload(hook)})

    def _delete_webhook(self, request: _Request, webhook_id: str) -> _Response:
        self._webhook_or_404(request, webhook_id)
        with self._lock:
            self._webhooks.pop(webhook_id, None)
        return _json_response({})
