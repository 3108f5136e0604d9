"""Jobs and scheduled jobs as `HfApi` calls them (`run_job`, `create_scheduled_job`, ...):
nothing ever runs; the server records each job (stage RUNNING) and answers with secret
names, never their values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from collections.abc import Mapping
from typing import Any

from fedbip_hub.testing.hub_server.state import _iso, _now
from fedbip_hub.testing.hub_server.transport import (
    _HubError,
    _json_response,
    _Request,
    _Response,
)

#: What HF Jobs accepts as a schedule: a macro or a five-field cron expression.
_SCHEDULE_MACROS = ("@annually", "@yearly", "@monthly", "@weekly", "@daily", "@hourly")
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?-]+")


class Jobs:
    """`HubServer`'s Jobs and scheduled-jobs routes, and their stored state."""

    _lock: threading.RLock
    _counter: itertools.count[int]
    _jobs: dict[str, dict[str, Any]]
    _scheduled: dict[str, dict[str, Any]]

    @property
    def jobs(self) -> dict[str, dict[str, Any]]:
        """Jobs started with `run_job` (or by triggering a scheduled job), by id."""
        with self._lock:
            return json.loads(json.dumps(self._jobs))

    @property
    def scheduled_jobs(self) -> dict[str, dict[str, Any]]:
        """Scheduled jobs by id: namespace, schedule, suspend, concurrency, spec, last job."""
        with self._lock:
            return json.loads(json.dumps(self._scheduled))

    def _job_owner(self, request: _Request, namespace: str) -> dict[str, str]:
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to use Jobs")
        if caller.role != "write" or not caller.owns(namespace):
            raise _HubError(
                403, f'You don\'t have the rights to use Jobs under the namespace "{namespace}"'
            )
        return {
            "id": hashlib.sha1(namespace.encode()).hexdigest()[:24],
            "name": namespace,
            "type": "user" if namespace == caller.user else "org",
        }

    @staticmethod
    def _check_job_spec(spec: Any) -> dict[str, Any]:
        if not isinstance(spec, dict):
            raise _HubError(400, "The job spec must be a JSON object")
        command = spec.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(part, str) for part in command)
        ):
            raise _HubError(400, "jobSpec.command must be a non-empty list of strings")
        if not (spec.get("dockerImage") or spec.get("spaceId")):
            raise _HubError(400, "jobSpec needs a dockerImage or a spaceId")
        for key in ("environment", "secrets"):
            value = spec.get(key) or {}
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
            ):
                raise _HubError(400, f"jobSpec.{key} must map names to strings")
        return json.loads(json.dumps(spec))

    @staticmethod
    def _public_spec(
        spec: Mapping[str, Any], secrets: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A job spec as the Hub shows it: secret names, never their values."""
        public = {k: v for k, v in spec.items() if k != "secrets"}
        public["secrets"] = sorted(secrets if secrets is not None else spec.get("secrets") or {})
        if "timeoutSeconds" in spec:
            public.setdefault("timeout", spec["timeoutSeconds"])
        return public

    def _new_id(self, kind: str) -> str:
        seed = f"{kind}/{next(self._counter)}/{_now().isoformat()}"
        return hashlib.sha1(seed.encode()).hexdigest()[:24]

    def _start_job(
        self,
        namespace: str,
        owner: dict[str, str],
        spec: dict[str, Any],
        scheduled_job_id: str | None = None,
    ) -> dict[str, Any]:
        job = {
            "id": self._new_id("job"),
            "namespace": namespace,
            "owner": owner,
            "createdAt": _iso(_now()),
            "spec": spec,
            "stage": "RUNNING",
            "scheduledJobId": scheduled_job_id,
        }
        with self._lock:
            self._jobs[job["id"]] = job
        return job

    def _job_payload(self, job: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **self._public_spec(job["spec"]),
            "id": job["id"],
            "createdAt": job["createdAt"],
            "owner": job["owner"],
            "status": {"stage": job["stage"], "message": None},
        }

    def _run_job(self, request: _Request, ns: str) -> _Response:
        owner = self._job_owner(request, ns)
        job = self._start_job(ns, owner, self._check_job_spec(request.json()))
        return _json_response(self._job_payload(job))

    def _list_jobs(self, request: _Request, ns: str) -> _Response:
        self._job_owner(request, ns)
        with self._lock:
            jobs = [j for j in self._jobs.values() if j["namespace"] == ns]
        return _json_response([self._job_payload(j) for j in jobs])

    def _get_job(self, request: _Request, ns: str, job_id: str) -> _Response:
        self._job_owner(request, ns)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job["namespace"] != ns:
            raise _HubError(404, f"Job not found: {job_id}")
        return _json_response(self._job_payload(job))

    @staticmethod
    def _check_schedule(schedule: Any) -> str:
        if isinstance(schedule, str):
            if schedule in _SCHEDULE_MACROS:
                return schedule
            fields = schedule.split()
            if len(fields) == 5 and all(_CRON_FIELD.fullmatch(f) for f in fields):
                return schedule
        raise _HubError(400, f"Invalid schedule: {schedule!r}")

    def _scheduled_payload(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": record["id"],
            "createdAt": record["createdAt"],
            "jobSpec": self._public_spec(record["spec"]),
            "schedule": record["schedule"],
            "suspend": record["suspend"],
            "concurrency": record["concurrency"],
            "status": {"lastJob": record["lastJob"], "nextJobRunAt": None},
            "owner": record["owner"],
        }

    def _scheduled_or_404(self, request: _Request, ns: str, job_id: str) -> dict[str, Any]:
        self._job_owner(request, ns)
        with self._lock:
            record = self._scheduled.get(job_id)
        if record is None or record["namespace"] != ns:
            raise _HubError(404, f"Scheduled job not found: {job_id}")
        return record

    def _create_scheduled_job(self, request: _Request, ns: str) -> _Response:
        owner = self._job_owner(request, ns)
        body = request.json()
        if not isinstance(body, dict):
            raise _HubError(400, "The body must be a JSON object")
        record = {
            "id": self._new_id("scheduled-job"),
            "namespace": ns,
            "owner": owner,
            "createdAt": _iso(_now()),
            "schedule": self._check_schedule(body.get("schedule")),
            "suspend": bool(body.get("suspend", False)),
            "concurrency": bool(body.get("concurrency", False)),
            "spec": self._check_job_spec(body.get("jobSpec")),
            "lastJob": None,
        }
        with self._lock:
            self._scheduled[record["id"]] = record
        return _json_response(self._scheduled_payload(record))

    def _list_scheduled_jobs(self, request: _Request, ns: str) -> _Response:
        self._job_owner(request, ns)
        label = request.query.get("label", [""])[-1]
        key, _, value = label.partition("=")
        with self._lock:
            records = [r for r in self._scheduled.values() if r["namespace"] == ns]
        if key:
            records = [r for r in records if (r["spec"].get("labels") or {}).get(key) == value]
        return _json_response([self._scheduled_payload(r) for r in records])

    def _get_scheduled_job(self, request: _Request, ns: str, job_id: str) -> _Response:
        return _json_response(self._scheduled_payload(self._scheduled_or_404(request, ns, job_id)))

    def _delete_scheduled_job(self, request: _Request, ns: str, job_id: str) -> _Response:
        self._scheduled_or_404(request, ns, job_id)
        with self._lock:
            self._scheduled.pop(job_id, None)
        return _json_response({})

    def _suspend_scheduled_job(
        self, request: _Request, ns: str, job_id: str, action: str
    ) -> _Response:
        record = self._scheduled_or_404(request, ns, job_id)
        with self._lock:
            record["suspend"] = action == "suspend"
        return _json_response({})

    def _reschedule_job(self, request: _Request, ns: str, job_id: str) -> _Response:
        record = self._scheduled_or_404(request, ns, job_id)
        schedule = self._check_schedule(request.json().get("schedule"))
        with self._lock:
            record["schedule"] = schedule
        return _json_response(self._scheduled_payload(record))

    def _trigger_scheduled_job(self, request: _Request, ns: str, job_id: str) -> _Response:
        record = self._scheduled_or_404(request, ns, job_id)
        job = self._start_job(ns, record["owner"], record["spec"], scheduled_job_id=job_id)
        with self._lock:
            record["lastJob"] = {"id": job["id"], "at": job["createdAt"]}
        return _json_response(self._job_payload(job))
