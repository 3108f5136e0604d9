"""The test Hub's app wiring: `HubServer` puts the route mixins together, owns the state
and the lock, starts and stops the HTTP server, and runs each request through fault
injection, authentication, routing and the request log.
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from fedbip_hub.testing.hub_server.access import (
    DEFAULT_ORGS,
    DEFAULT_TOKEN,
    DEFAULT_USER,
    AccessControl,
)
from fedbip_hub.testing.hub_server.cards import CardChecks
from fedbip_hub.testing.hub_server.commits import Commits
from fedbip_hub.testing.hub_server.counting import _MAX_LOG, ApiCall, RequestLog, RequestRecord
from fedbip_hub.testing.hub_server.faults import Fault, FaultInjection
from fedbip_hub.testing.hub_server.files import FileReads
from fedbip_hub.testing.hub_server.jobs import Jobs
from fedbip_hub.testing.hub_server.lfs import Preupload
from fedbip_hub.testing.hub_server.listings import Listings
from fedbip_hub.testing.hub_server.repos import RepoAdmin
from fedbip_hub.testing.hub_server.routes import find_route
from fedbip_hub.testing.hub_server.state import _Repo, _TokenInfo
from fedbip_hub.testing.hub_server.transport import (
    _error_response,
    _HTTPServer,
    _HubError,
    _json_response,
    _Request,
    _Response,
)
from fedbip_hub.testing.hub_server.webhooks import Webhooks


class HubServer(
    AccessControl,
    RequestLog,
    FaultInjection,
    RepoAdmin,
    Commits,
    Preupload,
    FileReads,
    Listings,
    Jobs,
    Webhooks,
    CardChecks,
):
    """An in-memory, Hub-compatible HTTP server on 127.0.0.1 (see the package docstring).

    Args:
        port: TCP port; 0 picks a free one (read `port` / `endpoint` after `start()`).
        host: interface to bind.
        token: the admin token registered at start (and after `reset()`).
        user: the admin token's user name.
        orgs: the organisations the admin user belongs to.
        gitattributes: give new repos an initial `.gitattributes`, as the real Hub does.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        orgs: Iterable[str] = DEFAULT_ORGS,
        gitattributes: bool = True,
    ):
        self.host = host
        self.token = token
        self.user = user
        self.orgs = tuple(orgs)
        self.gitattributes = gitattributes
        self._requested_port = port
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._tokens: dict[str, _TokenInfo] = {}
        self._faults: list[Fault] = []
        self._log: deque[RequestRecord] = deque(maxlen=_MAX_LOG)
        self._api_calls: deque[ApiCall] = deque(maxlen=_MAX_LOG)
        self._jobs: dict[str, dict[str, Any]] = {}
        self._scheduled: dict[str, dict[str, Any]] = {}
        self._webhooks: dict[str, dict[str, Any]] = {}
        self._errors: list[str] = []
        self._counter = itertools.count()
        #: Items per page of an unlimited repo listing (the real Hub's is 1000).
        self.list_page_size = 1000
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._reset_tokens()

    def start(self) -> HubServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"hub-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (pending delayed replies are released)."""
        self.clear_faults()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        """Base URL to use as HF_ENDPOINT, e.g. `http://127.0.0.1:8765`."""
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        """Drop every repo, fault and log entry; restore the initial token table."""
        with self._lock:
            self._repos.clear()
            self._log.clear()
            self._api_calls.clear()
            self._jobs.clear()
            self._scheduled.clear()
            self._webhooks.clear()
            self._errors.clear()
            self._reset_tokens()
        self.clear_faults()

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected server-side exceptions (each answered with a 500)."""
        with self._lock:
            return list(self._errors)

    def _note_error(self, trace: str) -> None:
        with self._lock:
            self._errors.append(trace)

    def _serve(self, request: _Request) -> _Response | None:
        """Answer one request (None: drop the connection). Logs before replying."""
        self._note_api_call(request)
        fault = self._take_fault(request.method, request.path)
        if fault is not None:
            if fault.delay > 0:
                fault._cancelled.wait(fault.delay)
            if fault.disconnect:
                self._record(request, 0)
                return None
            if fault.status is not None:
                response = self._fault_response(fault)
                self._record(request, response.status)
                return response
        response = self._dispatch(request)
        self._record(request, response.status)
        return response

    def _dispatch(self, request: _Request) -> _Response:
        try:
            request.caller = self._authenticate(request)
            handler, params = self._route(request)
            return handler(request, **params)
        except _HubError as err:
            return _error_response(err)
        except Exception:  # a bug in this server: answer 500 and keep the traceback
            self._note_error(traceback.format_exc())
            return _error_response(_HubError(500, "Internal error in the local hub server"))

    def _route(self, request: _Request) -> tuple[Callable[..., _Response], dict[str, str]]:
        name, params = find_route(request)
        return getattr(self, name), params

    def _agent_harnesses(self, request: _Request) -> _Response:
        """Registry huggingface_hub fetches once a day for its user agent; keep it empty."""
        return _json_response({"standardEnvVars": [], "harnesses": {}})
