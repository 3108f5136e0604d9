"""The route tables: which `HubServer` method answers each method and path, with the
path's parameters (404 for an unknown path, 405 for a known path with another method).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from fedbip_hub.testing.hub_server.state import _REPO_KINDS
from fedbip_hub.testing.hub_server.transport import _HubError, _Request

_Route = tuple[str, re.Pattern[str], str]
_API_REPO = re.compile(
    r"/api/(?P<kind>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)(?P<rest>/.*)?"
)
_RESOLVE = re.compile(
    r"/(?:(?P<kind>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)"
    r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
)
_REPO_ROUTES: list[_Route] = [
    ("GET", re.compile(r""), "_repo_info"),
    ("GET", re.compile(r"/revision/(?P<rev>.+)"), "_repo_info"),
    ("POST", re.compile(r"/preupload/(?P<rev>.+)"), "_preupload"),
    ("POST", re.compile(r"/commit/(?P<rev>.+)"), "_commit"),
    ("GET", re.compile(r"/refs"), "_refs"),
    ("GET", re.compile(r"/commits/(?P<rev>.+)"), "_commits"),
    ("POST", re.compile(r"/branch/(?P<branch>.+)"), "_create_branch"),
    ("DELETE", re.compile(r"/branch/(?P<branch>.+)"), "_delete_branch"),
    ("POST", re.compile(r"/tag/(?P<rev>.+)"), "_create_tag"),
    ("DELETE", re.compile(r"/tag/(?P<tag>.+)"), "_delete_tag"),
    ("GET", re.compile(r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "_tree"),
    ("POST", re.compile(r"/paths-info/(?P<rev>.+)"), "_paths_info"),
    ("PUT", re.compile(r"/settings"), "_settings"),
]
_JOBS = r"/api/jobs/(?P<ns>[^/]+)"
_SCHEDULED = r"/api/scheduled-jobs/(?P<ns>[^/]+)"
_JOB_ID = r"/(?P<job_id>[^/]+)"
_WEBHOOKS = r"/api/settings/webhooks"
_WEBHOOK_ID = r"/(?P<webhook_id>[^/]+)"
_GLOBAL_ROUTES: list[_Route] = [
    ("GET", re.compile(r"/api/whoami-v2"), "_whoami"),
    ("POST", re.compile(r"/api/repos/create"), "_create_repo"),
    ("DELETE", re.compile(r"/api/repos/delete"), "_delete_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "_validate_yaml"),
    ("GET", re.compile(r"/api/agent-harnesses"), "_agent_harnesses"),
    ("GET", re.compile(r"/api/(?P<kind>models|datasets|spaces)"), "_list_repos"),
    # Jobs (nothing runs: jobs are recorded with stage RUNNING)
    ("POST", re.compile(_JOBS), "_run_job"),
    ("GET", re.compile(_JOBS), "_list_jobs"),
    ("GET", re.compile(_JOBS + _JOB_ID), "_get_job"),
    # Scheduled jobs
    ("POST", re.compile(_SCHEDULED), "_create_scheduled_job"),
    ("GET", re.compile(_SCHEDULED), "_list_scheduled_jobs"),
    ("GET", re.compile(_SCHEDULED + _JOB_ID), "_get_scheduled_job"),
    ("DELETE", re.compile(_SCHEDULED + _JOB_ID), "_delete_scheduled_job"),
    (
        "POST",
        re.compile(_SCHEDULED + _JOB_ID + r"/(?P<action>suspend|resume)"),
        "_suspend_scheduled_job",
    ),
    ("POST", re.compile(_SCHEDULED + _JOB_ID + r"/run"), "_trigger_scheduled_job"),
    ("POST", re.compile(_SCHEDULED + _JOB_ID + r"/schedule"), "_reschedule_job"),
    # Webhooks
    ("GET", re.compile(_WEBHOOKS), "_list_webhooks"),
    ("POST", re.compile(_WEBHOOKS), "_create_webhook"),
    ("GET", re.compile(_WEBHOOKS + _WEBHOOK_ID), "_get_webhook"),
    ("POST", re.compile(_WEBHOOKS + _WEBHOOK_ID), "_update_webhook"),
    ("DELETE", re.compile(_WEBHOOKS + _WEBHOOK_ID), "_delete_webhook"),
    (
        "POST",
        re.compile(_WEBHOOKS + _WEBHOOK_ID + r"/(?P<action>enable|disable)"),
        "_toggle_webhook",
    ),
]


def find_route(request: _Request) -> tuple[str, dict[str, str]]:
    """The name of the `HubServer` method that answers `request`, and its arguments."""
    path = request.raw_path
    known_path = False
    for method, pattern, name in _GLOBAL_ROUTES:
        if found := pattern.fullmatch(path):
            known_path = True
            if method == request.method:
                return name, found.groupdict()
    match = _API_REPO.fullmatch(path)
    if match:
        rest = match["rest"] or ""
        for method, pattern, name in _REPO_ROUTES:
            sub = pattern.fullmatch(rest)
            if sub:
                known_path = True
                if method == request.method:
                    params = {
                        k: unquote(v) for k, v in sub.groupdict().items() if v is not None
                    }
                    return name, {**_repo_params(match), **params}
    match = _RESOLVE.fullmatch(path)
    if match and request.method in ("GET", "HEAD"):
        params = {"rev": unquote(match["rev"]), "path": unquote(match["path"])}
        return "_resolve", {**_repo_params(match), **params}
    if known_path:
        raise _HubError(405, f"Method {request.method} not allowed on {request.path}")
    raise _HubError(404, f"Not found: {request.path}")


def _repo_params(match: re.Match[str]) -> dict[str, str]:
    repo_type = _REPO_KINDS.get(match["kind"] or "models", "model")
    return {
        "repo_type": repo_type,
        "repo_id": f"{unquote(match['ns'])}/{unquote(match['name'])}",
    }
