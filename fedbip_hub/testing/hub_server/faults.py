"""Fault injection: make matching requests fail with a status (429s with `Retry-After` or
the Hub's `RateLimit` headers, 5xx, Hub error codes), answer late, or drop the connection.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus

from fedbip_hub.testing.hub_server.transport import _error_response, _HubError, _Response


@dataclass
class Fault:
    """An injected failure, as returned by `HubServer.inject_fault` (`hits`: times it fired)."""

    method: str | None
    pattern: re.Pattern[str]
    status: int | None
    times: int | None
    delay: float
    retry_after: int | None
    ratelimit: tuple[int, int] | None
    message: str | None
    error_code: str | None
    disconnect: bool
    hits: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        method_ok = self.method is None or self.method.upper() == method
        return method_ok and not self.exhausted and self.pattern.search(path) is not None


class FaultInjection:
    """`HubServer`'s fault controls; `_serve` asks `_take_fault` before routing."""

    _lock: threading.RLock
    _faults: list[Fault]

    def inject_fault(
        self,
        method: str | None = None,
        path_pattern: str = r".*",
        status: int | None = 503,
        *,
        times: int | None = 1,
        delay: float = 0.0,
        retry_after: int | None = None,
        ratelimit: tuple[int, int] | None = None,
        message: str | None = None,
        error_code: str | None = None,
        disconnect: bool = False,
    ) -> Fault:
        """Make matching requests fail.

        Args:
            method: HTTP method to match (None: any).
            path_pattern: regex searched in the URL-decoded path (no query string), e.g.
                r"/resolve/", r"/api/models/fedorg/x/commit/".
            status: status to answer; None answers normally (after `delay`).
            times: how many requests the fault hits; None: every request until cleared.
            delay: seconds to wait before answering; more than the client's timeout
                simulates a timeout.
            retry_after: adds a `Retry-After` header (seconds), e.g. with 429.
            ratelimit: (remaining, seconds to reset): adds the IETF-draft headers the
                real Hub sends, `RateLimit: "api";r=<remaining>;t=<seconds>` and
                `RateLimit-Policy: "fixed window";"api";q=1000;w=300`, e.g. with 429.
            message: error message (body `error` and `X-Error-Message`).
            error_code: `X-Error-Code` header, e.g. "RepoNotFound" or "EntryNotFound".
            disconnect: close the connection without any reply (a network error).
        """
        fault = Fault(
            method=method,
            pattern=re.compile(path_pattern),
            status=status,
            times=times,
            delay=delay,
            retry_after=retry_after,
            ratelimit=ratelimit,
            message=message,
            error_code=error_code,
            disconnect=disconnect,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault and release requests that are sleeping in a `delay`."""
        with self._lock:
            faults, self._faults = self._faults, []
        for fault in faults:
            fault._cancelled.set()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    @staticmethod
    def _fault_response(fault: Fault) -> _Response:
        status = int(fault.status or 500)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
        if fault.ratelimit is not None:
            remaining, reset = fault.ratelimit
            headers["RateLimit"] = f'"api";r={int(remaining)};t={int(reset)}'
            headers["RateLimit-Policy"] = '"fixed window";"api";q=1000;w=300'
        message = fault.message or f"{phrase} (injected fault)"
        return _error_response(_HubError(status, message, code=fault.error_code, headers=headers))
