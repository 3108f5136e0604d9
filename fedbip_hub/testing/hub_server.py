"""A local HTTP server that speaks enough of the Hugging Face Hub API for tests and demos.

It serves what `huggingface_hub.HfApi`, `hf_hub_download`, `snapshot_download` and
`peft.PeftModel.from_pretrained` use, for model, dataset and space repos: whoami, repo
creation and deletion, repo info, preupload (every file is "regular": no LFS, no Xet),
ndjson commits with `parentCommit` checks (HTTP 412), pull-request commits, refs,
commit history, branches, tags, tree listings, paths-info, `list_models(author=, search=,
expand=)` (paginated by `Link` headers)
and `resolve` downloads (HEAD and GET, with Range). It also keeps the Jobs and webhooks
APIs that `HfApi` calls (`run_job`, `create_scheduled_job`, `list_scheduled_jobs`,
`inspect_scheduled_job`, `suspend|resume|trigger|delete_scheduled_job`,
`create|list|get|update|enable|disable|delete_webhook`): nothing ever runs, the server
only records what was asked.

State lives in memory. Every commit is a full snapshot (path -> bytes) with its parent,
so any old commit id stays downloadable. Tests drive it from Python:

    server = HubServer().start()
    server.inject_fault(method="GET", path_pattern=r"/resolve/", status=503, times=1)
    server.add_token("hf_other", "bob", orgs=["bob-org"])
    server.revoke_token("hf_other")
    server.requests  # [(method, path, status), ...]
    server.request_counts()  # {"api": ..., "downloads": ..., "commits": ...}, as rate-limited
    server.inject_fault(path_pattern=r"/api/", status=429, ratelimit=(0, 2))  # RateLimit headers
    server.create_repo("fedorg/x", files={"a.txt": "a"})  # set-up without HTTP
    server.head("fedorg/x"), server.files("fedorg/x"), server.commits("fedorg/x")
    server.scheduled_jobs, server.jobs, server.webhooks  # stored state, secrets included
    server.api_calls  # [ApiCall(method, path, query, body)] for the Jobs/webhooks routes
    server.stop()

It uses the standard library only. Tokens are never logged or stored in the request log.
`api_calls` keeps the JSON bodies of Jobs and webhooks requests exactly as sent, secret
values included (that is where a test checks a token went only where it should); the
server's replies name secrets but never echo their values, as the real Hub does.
Run it by hand with `python -m fedbip_hub.testing.hub_server --port 8765`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import itertools
import json
import mimetypes
import re
import socket
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = [
    "DEFAULT_ORGS",
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "INVALID_CREDENTIALS",
    "ApiCall",
    "Commit",
    "Fault",
    "HubServer",
    "RequestRecord",
    "git_blob_oid",
]

DEFAULT_TOKEN = "hf_fedbip_local_admin_token"
DEFAULT_USER = "fed-admin"
DEFAULT_ORGS: tuple[str, ...] = ("fedorg",)
DEFAULT_BRANCH = "main"
#: The exact message the real Hub sends for a bad token; huggingface_hub keys on it.
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

_REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{7,40}")
_PR_REF = re.compile(r"refs/pr/(\d+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_MAX_LOG = 100_000  # request-log entries kept (oldest dropped first)
# What `expand=` may ask of a repo listing (the fields _info_payload has).
_LIST_EXPANDABLE = frozenset({
    "author", "sha", "lastModified", "createdAt", "private", "gated", "disabled",
    "downloads", "likes", "tags", "siblings", "usedStorage", "library_name",
})
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(data: bytes) -> str:
    """Git's blob id (sha1 of `blob <len>\\0<data>`): the Hub's ETag for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(moment: datetime) -> str:
    """Format a datetime the way the Hub does (`2024-01-02T03:04:05.678Z`)."""
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the repo's files plus git-like metadata."""

    oid: str
    parent: str | None
    files: Mapping[str, bytes]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    uid: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit | None:
        """Find the commit a branch, tag, `refs/...` name or (prefix of a) commit id names."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            name = revision.removeprefix(prefix)
            if name in refs:
                return self.commits[refs[name]]
        if (match := _PR_REF.fullmatch(revision)) and int(match[1]) in self.pull_requests:
            return self.commits[self.pull_requests[int(match[1])]]
        if _HEX_PREFIX.fullmatch(revision):
            found = [oid for oid in self.commits if oid.startswith(revision)]
            if len(found) == 1:
                return self.commits[found[0]]
        return None

    def history(self, commit: Commit) -> Iterator[Commit]:
        """Walk from `commit` back to the initial commit."""
        current: Commit | None = commit
        while current is not None:
            yield current
            current = self.commits[current.parent] if current.parent else None


@dataclass
class _TokenInfo:
    user: str
    orgs: tuple[str, ...]
    role: str
    revoked: bool = False

    def owns(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs


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


# --------------------------------------------------------------------------- HTTP plumbing


class _HubError(Exception):
    """Raised by route handlers; becomes a JSON error reply with Hub error headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass
class _Request:
    method: str
    raw_path: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    caller: _TokenInfo | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise _HubError(400, f"Invalid JSON body: {err}") from err

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true", "yes")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


_MODEL_ID = re.compile(r"(?:[\w\-.]+/)?[\w\-.]{1,96}")


def _card_base_models(content: str) -> list[str]:
    """The ``base_model`` values of a card's YAML front matter (a scalar or a block list;
    the standard library has no YAML parser, and the cards' writer emits only these)."""
    lines = content.splitlines()
    if not lines or lines[0].strip() != "---":
        return []
    front = list(itertools.takewhile(lambda line: line.strip() != "---", lines[1:]))
    values: list[str] = []
    for i, line in enumerate(front):
        if not line.startswith("base_model:"):
            continue
        scalar = line.partition(":")[2].strip().strip("'\"")
        if scalar:
            return [scalar]
        for item in front[i + 1:]:
            if not item.lstrip().startswith("- "):
                break
            values.append(item.lstrip()[2:].strip().strip("'\""))
    return values


def _json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> _Response:
    body = json.dumps(payload).encode()
    return _Response(
        status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
    )


def _header_safe(text: str) -> str:
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")[:500]


def _error_response(err: _HubError) -> _Response:
    headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return _json_response({"error": err.message, **err.extra}, err.status, headers)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer):
        self.hub = hub
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hung up; keep any other traceback in `HubServer.errors`."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        self.hub._note_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each small reply waits ~40 ms for a delayed ACK
    server: _HTTPServer
    server_version = "FedbipLocalHub/1.0"

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default access log (the hub keeps its own, token-free one)."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        request = _Request(
            method=self.command,
            raw_path=split.path,
            path=unquote(split.path),
            query=parse_qs(split.query, keep_blank_values=True),
            headers=self.headers,
            body=self._read_body(),
        )
        response = hub._serve(request)
        if response is None:  # injected disconnect
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        request_id = self.headers.get("X-Amzn-Trace-Id") or self.headers.get("X-Request-Id")
        if request_id:
            response.headers.setdefault("X-Request-Id", _header_safe(request_id))
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD" and response.body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client gave up (e.g. its timeout fired)


# --------------------------------------------------------------------------- the server

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
_API_CALL_PATH = re.compile(r"/api/(jobs|scheduled-jobs|settings/webhooks)(/.*)?")
#: What HF Jobs accepts as a schedule: a macro or a five-field cron expression.
_SCHEDULE_MACROS = ("@annually", "@yearly", "@monthly", "@weekly", "@daily", "@hourly")
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?-]+")
_WATCH_TYPES = ("bucket", "dataset", "model", "org", "space", "user")


class HubServer:
    """An in-memory, Hub-compatible HTTP server on 127.0.0.1 (see the module docstring).

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

    # ------------------------------------------------------------------ lifecycle

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

    # ------------------------------------------------------------------ test controls

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

    def add_token(
        self, token: str, user: str, orgs: Iterable[str] = (), *, role: str = "write"
    ) -> None:
        """Register `token` for `user` (member of `orgs`); `role` is "write" or "read"."""
        if role not in ("write", "read"):
            raise ValueError(f"role must be 'write' or 'read', not {role!r}")
        with self._lock:
            self._tokens[token] = _TokenInfo(user=user, orgs=tuple(orgs), role=role)

    def revoke_token(self, token: str) -> None:
        """Make `token` answer 401 "Invalid credentials in Authorization header" everywhere."""
        with self._lock:
            if token not in self._tokens:
                raise KeyError("unknown token")
            self._tokens[token].revoked = True

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

    @property
    def webhooks(self) -> dict[str, dict[str, Any]]:
        """Webhooks by id: owner, watched, domains, secret, job source and job secrets."""
        with self._lock:
            return json.loads(json.dumps(self._webhooks))

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected server-side exceptions (each answered with a 500)."""
        with self._lock:
            return list(self._errors)

    # ------------------------------------------------------------------ direct state access

    def create_repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        private: bool = False,
        files: Mapping[str, bytes | str] | None = None,
    ) -> str:
        """Create a repo without HTTP (optionally with files); returns the head commit id."""
        with self._lock:
            repo = self._new_repo(repo_type, repo_id, private)
            if files:
                head = repo.commits[repo.branches[DEFAULT_BRANCH]]
                snapshot = dict(head.files)
                snapshot.update(
                    {p: v.encode() if isinstance(v, str) else v for p, v in files.items()}
                )
                self._add_commit(repo, DEFAULT_BRANCH, head, snapshot, "Add files", "", self.user)
            return repo.branches[DEFAULT_BRANCH]

    def head(
        self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model"
    ) -> str:
        """The commit id `revision` points to."""
        return self._lookup(repo_id, repo_type, revision).oid

    def files(
        self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """Every file (path -> bytes) at `revision`."""
        return dict(self._lookup(repo_id, repo_type, revision).files)

    def commits(
        self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model"
    ) -> list[Commit]:
        """The history of `revision`, newest first."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return list(repo.history(self._lookup(repo_id, repo_type, revision)))

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def _lookup(self, repo_id: str, repo_type: str, revision: str) -> Commit:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r}")
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"no revision {revision!r} in {repo_id!r}")
            return commit

    # ------------------------------------------------------------------ request pipeline

    def _reset_tokens(self) -> None:
        self._tokens = {self.token: _TokenInfo(user=self.user, orgs=self.orgs, role="write")}

    def _note_error(self, trace: str) -> None:
        with self._lock:
            self._errors.append(trace)

    def _record(self, request: _Request, status: int) -> None:
        with self._lock:
            self._log.append(RequestRecord(request.method, request.path, status))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _serve(self, request: _Request) -> _Response | None:
        """Answer one request (None: drop the connection). Logs before replying."""
        if _API_CALL_PATH.fullmatch(request.raw_path):
            try:
                body = json.loads(request.body) if request.body else None
            except ValueError:
                body = request.body.decode("utf-8", "replace")
            with self._lock:
                self._api_calls.append(
                    ApiCall(request.method, request.path, dict(request.query), body)
                )
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

    def _authenticate(self, request: _Request) -> _TokenInfo | None:
        header = request.headers.get("Authorization") or ""
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        with self._lock:
            info = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None or info.revoked:
            raise _HubError(401, INVALID_CREDENTIALS)
        return info

    def _route(self, request: _Request) -> tuple[Callable[..., _Response], dict[str, str]]:
        path = request.raw_path
        known_path = False
        for method, pattern, name in _GLOBAL_ROUTES:
            if found := pattern.fullmatch(path):
                known_path = True
                if method == request.method:
                    return getattr(self, name), found.groupdict()
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
                        return getattr(self, name), {**self._repo_params(match), **params}
        match = _RESOLVE.fullmatch(path)
        if match and request.method in ("GET", "HEAD"):
            params = {"rev": unquote(match["rev"]), "path": unquote(match["path"])}
            return self._resolve, {**self._repo_params(match), **params}
        if known_path:
            raise _HubError(405, f"Method {request.method} not allowed on {request.path}")
        raise _HubError(404, f"Not found: {request.path}")

    @staticmethod
    def _repo_params(match: re.Match[str]) -> dict[str, str]:
        repo_type = _REPO_KINDS.get(match["kind"] or "models", "model")
        return {
            "repo_type": repo_type,
            "repo_id": f"{unquote(match['ns'])}/{unquote(match['name'])}",
        }

    # ------------------------------------------------------------------ access control

    def _readable(self, request: _Request, repo_type: str, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        caller = request.caller
        if repo is not None and (not repo.private or (caller and caller.owns(repo.namespace))):
            return repo
        message = f"Repository not found: {_URL_PREFIX[repo_type]}{repo_id}"
        # Like the real Hub: anonymous callers get 401, authenticated ones 404.
        raise _HubError(401 if caller is None else 404, message, code="RepoNotFound")

    def _writable(self, request: _Request, repo_type: str, repo_id: str) -> _Repo:
        repo = self._readable(request, repo_type, repo_id)
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to write to this repository")
        if caller.role != "write" or not caller.owns(repo.namespace):
            raise _HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    # ------------------------------------------------------------------ repo/commit helpers

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        namespace, _, name = repo_id.partition("/")
        if not (_REPO_NAME.fullmatch(namespace) and _REPO_NAME.fullmatch(name)):
            raise _HubError(400, f"Invalid repo id: {repo_id!r}")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise _HubError(
                    409,
                    f"You already created this {repo_type} repo",
                    extra={"url": self._url(repo_type, repo_id)},
                )
            created = _now()
            repo = _Repo(
                repo_type=repo_type,
                repo_id=repo_id,
                private=private,
                created_at=created,
                uid=hashlib.sha1(
                    f"{repo_type}/{repo_id}/{next(self._counter)}".encode()
                ).hexdigest()[:24],
            )
            files = {".gitattributes": _GITATTRIBUTES} if self.gitattributes else {}
            self._add_commit(repo, DEFAULT_BRANCH, None, files, "initial commit", "", "system")
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def _add_commit(
        self,
        repo: _Repo,
        branch: str | None,
        parent: Commit | None,
        files: Mapping[str, bytes],
        title: str,
        message: str,
        author: str,
    ) -> Commit:
        """Record a new commit on top of `parent` and move `branch` (if any) to it."""
        date = _now()
        seed = json.dumps(
            [
                parent.oid if parent else None,
                sorted((p, git_blob_oid(d)) for p, d in files.items()),
                title,
                message,
                author,
                _iso(date),
                next(self._counter),
            ]
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(
            oid=oid,
            parent=parent.oid if parent else None,
            files=MappingProxyType(dict(files)),
            title=title,
            message=message,
            author=author,
            date=date,
        )
        repo.commits[oid] = commit
        if branch is not None:
            repo.branches[branch] = oid
        return commit

    def _resolve_or_404(self, repo: _Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    def _branch_or_404(self, repo: _Repo, revision: str) -> str:
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return branch

    @staticmethod
    def _tree_oid(files: Mapping[str, bytes], directory: str) -> str:
        prefix = directory.rstrip("/") + "/"
        listing = sorted((p, git_blob_oid(d)) for p, d in files.items() if p.startswith(prefix))
        return hashlib.sha1(json.dumps(listing).encode()).hexdigest()

    def _entry(
        self, repo: _Repo, commit: Commit, path: str, is_dir: bool, expand: bool
    ) -> dict[str, Any]:
        if is_dir:
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": self._tree_oid(commit.files, path),
                "size": 0,
                "path": path,
            }
        else:
            data = commit.files[path]
            entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        if expand:
            last = self._last_commit(repo, commit, path, is_dir)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": _iso(last.date)}
        return entry

    def _last_commit(self, repo: _Repo, commit: Commit, path: str, is_dir: bool) -> Commit:
        def state(c: Commit) -> str | None:
            if is_dir:
                return self._tree_oid(c.files, path)
            return git_blob_oid(c.files[path]) if path in c.files else None

        current = state(commit)
        last = commit
        for older in repo.history(commit):
            if state(older) != current:
                break
            last = older
        return last

    # ------------------------------------------------------------------ global routes

    def _whoami(self, request: _Request) -> _Response:
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to access this endpoint")
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(caller.user.encode()).hexdigest()[:24],
                "name": caller.user,
                "fullname": caller.user,
                "email": None,
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [
                    {"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"}
                    for org in caller.orgs
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": caller.role},
                },
            }
        )

    def _create_repo(self, request: _Request) -> _Response:
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to create a repo")
        body = request.json()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or caller.user
        repo_id = f"{namespace}/{body.get('name', '')}"
        if caller.role != "write" or not caller.owns(namespace):
            raise _HubError(
                403,
                f"You don't have the rights to create a {repo_type} "
                f'under the namespace "{namespace}"',
            )
        private = bool(body.get("private")) or body.get("visibility") == "private"
        repo = self._new_repo(repo_type, repo_id, private)
        return _json_response(
            {"url": self._url(repo_type, repo_id), "name": repo_id, "id": repo.uid}
        )

    def _delete_repo(self, request: _Request) -> _Response:
        body = request.json()
        namespace = body.get("organization") or (request.caller.user if request.caller else "")
        repo_type = body.get("type") or "model"
        repo_id = f"{namespace}/{body.get('name', '')}"
        self._writable(request, repo_type, repo_id)
        with self._lock:
            self._repos.pop((repo_type, repo_id), None)
        return _json_response({})

    def _validate_yaml(self, request: _Request) -> _Response:
        """The Hub's check of a model card's metadata, for the one rule fedbip's cards
        could break: ``base_model`` must name models by id, never by path."""
        body = request.json()
        errors = [{"message": f'"base_model" with value "{value}" is not valid. Use a model '
                              "id from https://hf.co/models."}
                  for value in _card_base_models(str(body.get("content") or ""))
                  if not _MODEL_ID.fullmatch(value) or ".." in value or "--" in value]
        return _json_response({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _agent_harnesses(self, request: _Request) -> _Response:
        """Registry huggingface_hub fetches once a day for its user agent; keep it empty."""
        return _json_response({"standardEnvVars": [], "harnesses": {}})

    # ------------------------------------------------------------------ repo routes

    def _repo_info(
        self, request: _Request, repo_type: str, repo_id: str, rev: str = DEFAULT_BRANCH
    ) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        with self._lock:
            commit = self._resolve_or_404(repo, rev)
        return _json_response(self._info_payload(repo, commit, request.flag("blobs")))

    def _list_repos(self, request: _Request, kind: str) -> _Response:
        """`list_models` / `list_datasets`, as the real Hub answers them: filters `author`
        and `search` (a case-insensitive substring of the id), `limit`, and `expand`
        (repeated `expand=` or `expand[]=`): with it, each item carries `_id`, `id` and
        only the fields asked for. Without `limit`, pages of `list_page_size` items
        linked by a `Link: <...&cursor=N>; rel="next"` header, which huggingface_hub's
        paginate follows."""
        repo_type = _REPO_KINDS[kind]
        author = request.query.get("author", [None])[-1]
        search = (request.query.get("search", [""])[-1] or "").lower()
        limit = int(request.query.get("limit", ["0"])[-1] or 0)
        expand = request.query.get("expand", []) + request.query.get("expand[]", [])
        unknown = sorted(set(expand) - _LIST_EXPANDABLE)
        if unknown:
            raise _HubError(400, f"Invalid expand value(s): {', '.join(unknown)}")
        try:
            cursor = int(request.query.get("cursor", ["0"])[-1] or 0)
        except ValueError as err:
            raise _HubError(400, "Invalid cursor") from err
        caller = request.caller
        with self._lock:
            repos = [
                repo
                for (kind_, _), repo in sorted(self._repos.items())
                if kind_ == repo_type
                and (not repo.private or (caller and caller.owns(repo.namespace)))
                and (author is None or repo.namespace == author)
                and search in repo.repo_id.lower()
            ]
            heads = [repo.commits[repo.branches[DEFAULT_BRANCH]] for repo in repos]
        size = limit if limit > 0 else self.list_page_size
        page = list(zip(repos, heads, strict=True))[cursor:cursor + size]
        payload = [self._info_payload(r, c, False) for r, c in page]
        if expand:
            keep = {"_id", "id", *expand}
            payload = [{k: v for k, v in item.items() if k in keep} for item in payload]
        headers: dict[str, str] = {}
        if limit <= 0 and cursor + size < len(repos):
            query = [(k, v) for k, values in request.query.items() if k != "cursor"
                     for v in values] + [("cursor", str(cursor + size))]
            link = f"{self.endpoint}/api/{kind}?{urlencode(query)}"
            headers["Link"] = f'<{link}>; rel="next"'
        return _json_response(payload, headers=headers)

    @staticmethod
    def _info_payload(repo: _Repo, commit: Commit, with_blobs: bool) -> dict[str, Any]:
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                data = commit.files[path]
                sibling.update(size=len(data), blobId=git_blob_oid(data))
            siblings.append(sibling)
        payload: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        if repo.repo_type == "model":
            payload["library_name"] = "peft" if "adapter_config.json" in commit.files else None
        return payload

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        body = request.json()
        with self._lock:
            commit = (
                self._resolve_or_404(repo, rev)
                if request.flag("create_pr")
                else repo.commits[repo.branches[self._branch_or_404(repo, rev)]]
            )
        files = []
        for item in body.get("files", []):
            entry: dict[str, Any] = {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
            }
            if item["path"] in commit.files:
                entry["oid"] = git_blob_oid(commit.files[item["path"]])
            files.append(entry)
        return _json_response({"files": files, "commitOid": commit.oid})

    def _commit(self, request: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        assert request.caller is not None
        header, operations = self._parse_ndjson(request.body)
        create_pr = request.flag("create_pr")
        with self._lock:
            if create_pr:
                base = self._resolve_or_404(repo, rev)
                branch = None
            else:
                branch = self._branch_or_404(repo, rev)
                base = repo.commits[repo.branches[branch]]
            parent_commit = str(header.get("parentCommit") or "").lower()
            if parent_commit and not base.oid.startswith(parent_commit):
                raise _HubError(
                    412,
                    "A commit has happened since. Please refresh and try again. "
                    f"(parent commit {parent_commit} is not the head {base.oid} of {rev})",
                )
            files = self._apply_operations(dict(base.files), operations)
            commit = self._add_commit(
                repo,
                branch,
                base,
                files,
                str(header.get("summary") or "Upload files"),
                str(header.get("description") or ""),
                request.caller.user,
            )
            payload: dict[str, Any] = {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._url(repo_type, repo_id)}/commit/{commit.oid}",
                "hookOutput": "",
            }
            if create_pr:
                number = max(repo.pull_requests, default=0) + 1
                repo.pull_requests[number] = commit.oid
                payload["pullRequestUrl"] = f"{self._url(repo_type, repo_id)}/discussions/{number}"
        return _json_response(payload)

    @staticmethod
    def _parse_ndjson(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
        header: dict[str, Any] | None = None
        operations: list[tuple[str, dict[str, Any]]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as err:
                raise _HubError(400, f"Malformed ndjson commit line: {err}") from err
            if key == "header":
                header = value
            else:
                operations.append((key, value))
        if header is None:
            raise _HubError(400, "Commit payload has no header line")
        return header, operations

    @staticmethod
    def _apply_operations(
        files: dict[str, bytes], operations: list[tuple[str, dict[str, Any]]]
    ) -> dict[str, bytes]:
        for key, value in operations:
            path = str(value.get("path", "")).strip("/")
            if not path or ".." in path.split("/"):
                raise _HubError(400, f"Invalid path in commit: {value.get('path')!r}")
            if key == "file":
                encoding = value.get("encoding", "base64")
                content = value.get("content", "")
                if encoding == "base64":
                    files[path] = base64.b64decode(content)
                else:
                    files[path] = str(content).encode()
            elif key == "deletedFile":
                if path not in files:
                    raise _HubError(
                        404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                    )
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise _HubError(
                        404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound"
                    )
                for doomed_path in doomed:
                    del files[doomed_path]
            elif key == "lfsFile":
                raise _HubError(400, "This local hub accepts regular (non-LFS) uploads only")
            else:
                raise _HubError(400, f"Unknown commit operation: {key}")
        return files

    def _refs(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        with self._lock:
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid}
                for n, oid in sorted(repo.branches.items())
            ]
            tags = [
                {"name": n, "ref": f"refs/tags/{n}", "targetCommit": oid}
                for n, oid in sorted(repo.tags.items())
            ]
            prs = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": oid}
                for n, oid in sorted(repo.pull_requests.items())
            ]
        payload = {"branches": branches, "tags": tags, "converts": [], "pullRequests": prs}
        return _json_response(payload)

    def _commits(self, request: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        with self._lock:
            history = list(repo.history(self._resolve_or_404(repo, rev)))
        payload = [
            {
                "id": c.oid,
                "title": c.title,
                "message": c.message,
                "date": _iso(c.date),
                "authors": [{"user": c.author, "avatar": ""}],
            }
            for c in history
        ]
        return _json_response(payload)

    def _create_branch(
        self, request: _Request, repo_type: str, repo_id: str, branch: str
    ) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        starting_point = request.json().get("startingPoint") or DEFAULT_BRANCH
        with self._lock:
            if branch in repo.branches:
                raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._resolve_or_404(repo, starting_point).oid
        return _json_response({})

    def _delete_branch(
        self, request: _Request, repo_type: str, repo_id: str, branch: str
    ) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        with self._lock:
            if branch == DEFAULT_BRANCH:
                raise _HubError(403, "You cannot delete the default branch")
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            del repo.branches[branch]
        return _json_response({})

    def _create_tag(self, request: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        tag = str(request.json().get("tag") or "")
        with self._lock:
            if not tag:
                raise _HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise _HubError(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = self._resolve_or_404(repo, rev).oid
        return _json_response({})

    def _delete_tag(self, request: _Request, repo_type: str, repo_id: str, tag: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        with self._lock:
            if repo.tags.pop(tag, None) is None:
                raise _HubError(404, f"Invalid rev id: {tag}", code="RevisionNotFound")
        return _json_response({})

    def _tree(
        self, request: _Request, repo_type: str, repo_id: str, rev: str, path: str = ""
    ) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        with self._lock:
            commit = self._resolve_or_404(repo, rev)
        directory = path.strip("/")
        prefix = f"{directory}/" if directory else ""
        below = sorted(p for p in commit.files if p.startswith(prefix))
        if directory and not below:
            raise _HubError(
                404,
                f"{directory} does not exist on {rev}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.oid},
            )
        recursive, expand = request.flag("recursive"), request.flag("expand")
        dirs: set[str] = set()
        file_paths: list[str] = []
        for file_path in below:
            parts = file_path[len(prefix) :].split("/")
            if recursive:
                dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
                file_paths.append(file_path)
            elif len(parts) > 1:
                dirs.add(prefix + parts[0])
            else:
                file_paths.append(file_path)
        entries = [self._entry(repo, commit, d, True, expand) for d in sorted(dirs)]
        entries += [self._entry(repo, commit, f, False, expand) for f in file_paths]
        return _json_response(entries)

    def _paths_info(self, request: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        with self._lock:
            commit = self._resolve_or_404(repo, rev)
        content_type = request.headers.get("Content-Type", "")
        if "json" in content_type:
            body = request.json()
            paths, expand = list(body.get("paths", [])), bool(body.get("expand"))
        else:
            form = parse_qs(request.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        entries = []
        for raw in paths:
            path = raw.strip("/")
            if path in commit.files:
                entries.append(self._entry(repo, commit, path, False, expand))
            elif path and any(p.startswith(path + "/") for p in commit.files):
                entries.append(self._entry(repo, commit, path, True, expand))
        return _json_response(entries)

    def _settings(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        body = request.json()
        with self._lock:
            if "private" in body:
                repo.private = bool(body["private"])
            if body.get("visibility") in ("public", "private"):
                repo.private = body["visibility"] == "private"
        return _json_response({})

    def _resolve(
        self, request: _Request, repo_type: str, repo_id: str, rev: str, path: str
    ) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        with self._lock:
            commit = self._resolve_or_404(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise _HubError(
                404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        name = path.rsplit("/", 1)[-1]
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type == "application/json":
            content_type += "; charset=utf-8"
        headers = {
            "Content-Type": content_type,
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": (
                f"inline; filename*=UTF-8''{quote(name)}; filename=\"{_header_safe(name)}\";"
            ),
        }
        wanted = _RANGE.fullmatch(request.headers.get("Range", "").strip())
        if wanted and request.method == "GET" and (wanted[1] or wanted[2]):
            size = len(data)
            if wanted[1]:
                start, end = int(wanted[1]), int(wanted[2]) if wanted[2] else size - 1
            else:  # suffix range: the last N bytes
                start, end = max(size - int(wanted[2]), 0), size - 1
            if start >= size or start > end:
                raise _HubError(
                    416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            end = min(end, size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return _Response(206, data[start : end + 1], headers)
        return _Response(200, data, headers)

    # ------------------------------------------------------------------ jobs and webhooks

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


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub-compatible server")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="admin token to accept")
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--org", action="append", dest="orgs", help="admin's org (repeatable)")
    args = parser.parse_args(argv)
    orgs = tuple(args.orgs) if args.orgs else DEFAULT_ORGS
    server = HubServer(args.port, host=args.host, token=args.token, user=args.user, orgs=orgs)
    server.start()
    print(f"Local Hub listening on {server.endpoint}", flush=True)
    print(f"  export HF_ENDPOINT={server.endpoint} HF_HUB_DISABLE_XET=1", flush=True)
    print(f"  user {args.user!r}, orgs {list(orgs)}: set HF_TOKEN to the --token value", flush=True)
    print("  (default: fedbip_hub.testing.hub_server.DEFAULT_TOKEN)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
