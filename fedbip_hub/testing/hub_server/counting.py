"""Request counting: the token-free request log, what the Hub's rate limits would count
over it, and the Jobs and webhooks calls as sent (see the package docstring on secrets).
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from typing import Any, NamedTuple

from fedbip_hub.testing.hub_server.transport import _Request

_MAX_LOG = 100_000  # request-log entries kept (oldest dropped first)
_API_CALL_PATH = re.compile(r"/api/(jobs|scheduled-jobs|settings/webhooks)(/.*)?")


class ApiCall(NamedTuple):
    """One Jobs or webhooks request: method, path, query string and JSON body as sent."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


class RequestRecord(NamedTuple):
    """One served request: method, URL-decoded path (no query string) and status (0: dropped)."""

    method: str
    path: str
    status: int


class RequestLog:
    """`HubServer`'s request log; `_serve` notes every request before replying."""

    _lock: threading.RLock
    _log: deque[RequestRecord]
    _api_calls: deque[ApiCall]

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log: `(method, path, status)` tuples, oldest first."""
        with self._lock:
            return list(self._log)

    def request_counts(self, since: int = 0) -> dict[str, int]:
        """What the Hub's rate limits count, over the request log from entry ``since``
        (``len(server.requests)`` taken before): ``api`` (every /api/ request, commits
        included), ``downloads`` (resolve HEADs and GETs) and ``commits`` (commit POSTs)."""
        counts = {"api": 0, "downloads": 0, "commits": 0}
        for record in self.requests[since:]:
            if record.path.startswith("/api/"):
                counts["api"] += 1
                if record.method == "POST" and "/commit/" in record.path:
                    counts["commits"] += 1
            elif "/resolve/" in record.path:
                counts["downloads"] += 1
        return counts

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()
            self._api_calls.clear()

    @property
    def api_calls(self) -> list[ApiCall]:
        """Jobs and webhooks requests (method, path, query, JSON body), oldest first.

        Bodies are kept as sent, secret values included; see the module docstring.
        """
        with self._lock:
            return list(self._api_calls)

    def _record(self, request: _Request, status: int) -> None:
        with self._lock:
            self._log.append(RequestRecord(request.method, request.path, status))

    def _note_api_call(self, request: _Request) -> None:
        """Keep a Jobs or webhooks request's JSON body as sent (other routes: nothing)."""
        if _API_CALL_PATH.fullmatch(request.raw_path):
            try:
                body = json.loads(request.body) if request.body else None
            except ValueError:
                body = request.body.decode("utf-8", "replace")
            with self._lock:
                self._api_calls.append(
                    ApiCall(request.method, request.path, dict(request.query), body)
                )
