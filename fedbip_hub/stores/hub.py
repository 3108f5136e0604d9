"""The Hugging Face Hub as a store, through huggingface_hub's HfApi and HTTP client.

Private repos, one ``create_commit`` per logical write with ``parent_commit`` for
optimistic concurrency, every read pinned to a commit id. HF_ENDPOINT and HF_TOKEN are
honoured because huggingface_hub reads them; the token never appears in our messages.

Robustness, on top of what huggingface_hub does by itself:

- Every HTTP request made on behalf of a HubStore is bounded by ``timeout`` (constructor,
  or ``FEDBIP_HUB_TIMEOUT``; huggingface_hub itself sets none on most calls). A request
  hook on huggingface_hub's shared httpx2 client applies it (see ``_install_timeout_hook``).
- Transient failures (HTTP 408/429/5xx, timeouts, dropped connections) are retried here
  with exponential backoff, honouring ``Retry-After``. Listings and downloads are plain
  GETs on the shared client rather than HfApi's paginated helpers and hf_hub_download,
  whose own retries (1, 2, 4, 8, 8 s) would make a dead Hub take minutes to report, and
  whose LocalEntryNotFoundError hides the real status.
- A commit is never blindly re-sent. Each commit carries a write id in its description
  and is always sent with ``parent_commit`` set; after an ambiguous failure (timeout,
  dropped reply, 5xx) the history is checked for that write id before trying again, so
  a commit whose reply was lost is recognised instead of being applied twice or
  reported as a conflict.
- Errors become NotFoundError / AuthError / ConflictError / StoreError with a hint; the
  token is scrubbed from every message.
"""

from __future__ import annotations

import contextvars
import functools
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from fedbip_hub.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    FedbipError,
    NotFoundError,
    StoreError,
)
from fedbip_hub.secrets import REDACTED, redact
from fedbip_hub.stores.base import CommitInfo, FileContent, Store

T = TypeVar("T")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_TIMEOUT = 30.0
TIMEOUT_ENV = "FEDBIP_HUB_TIMEOUT"
WRITE_ID_TRAILER = "Fedbip-Write-Id"
_UNAVAILABLE_HINT = ("The Hub may be unavailable or overloaded; retry later. Set "
                     f"{TIMEOUT_ENV} (seconds) if your link to it is slow.")

# -- per-request timeout -------------------------------------------------------------------
# huggingface_hub shares one httpx2.Client, built by a process-wide factory, and most HfApi
# calls pass no timeout. A request hook on that client reads the timeout of the HubStore
# call in progress (a context variable, so threads and stores do not interfere) and sets
# it on the request; requests made outside a HubStore call keep the library's behaviour.
_REQUEST_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "fedbip_hub_request_timeout", default=None)
_HOOK_LOCK = threading.Lock()


def _timeout_hook(request: Any) -> None:
    timeout = _REQUEST_TIMEOUT.get()
    if timeout is not None:
        import httpx2

        request.extensions = {**request.extensions,
                              "timeout": httpx2.Timeout(timeout).as_dict()}


def _add_hook(client: Any) -> None:
    hooks = client.event_hooks
    if _timeout_hook not in hooks.get("request", []):
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _timeout_hook]}


def _install_timeout_hook() -> None:
    """Wrap huggingface_hub's client factory (keeping its hooks) and hook the live client."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http, get_session

    with _HOOK_LOCK:
        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        if not getattr(current, "_fedbip_timeout", False):
            def factory() -> Any:
                client = current()
                _add_hook(client)
                return client

            factory._fedbip_timeout = True  # type: ignore[attr-defined]
            set_client_factory(factory)
        # Someone may have replaced the factory after us, or built the client before.
        _add_hook(get_session())


def _env_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds.",
                          hint=f"Unset it, or set e.g. {TIMEOUT_ENV}=60.")
    return value


# -- failure classification ----------------------------------------------------------------
def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _root_cause(exc: BaseException) -> BaseException:
    """hf_hub_download (PEFT, snapshot_download) wraps a failed HEAD in
    LocalEntryNotFoundError; look through it to the real failure."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _is_transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    exc = _root_cause(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError
                  | httpx2.RemoteProtocolError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, OSError) and str(exc).startswith("Consistency check failed"):
        return True  # a download got fewer bytes than announced: a cut transfer
    return _status(exc) in TRANSIENT_STATUS


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(_root_cause(exc), "response", None)
    headers = getattr(response, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _describe_transient(exc: BaseException, timeout: float) -> str:
    import httpx2

    exc = _root_cause(exc)
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, httpx2.NetworkError | httpx2.RemoteProtocolError | ConnectionError):
        return f"connection failed or dropped ({type(exc).__name__})"
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    return type(exc).__name__


def _server_message(exc: BaseException) -> str:
    """The Hub's own error text, when it sent one (first line only)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    message = headers.get("X-Error-Message") if headers is not None else None
    if not message:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return message[:300]


class HubStore(Store):
    """Repos on a Hub (the real one, or any Hub-compatible endpoint).

    Args:
        token: a token; None uses HF_TOKEN or the stored login (huggingface_hub's get_token).
        endpoint: None uses HF_ENDPOINT.
        cache_dir: where pinned files are materialised (default: $HF_HOME/fedbip).
        retries: attempts per call for transient failures (5xx, 429, timeouts, dropped
            connections); at least 1.
        backoff: first wait between attempts, in seconds; doubles after each failure.
        max_backoff: cap on one wait, including a server's Retry-After.
        timeout: seconds any HTTP request may wait on one network step (connecting, or
            any single read or write); None reads FEDBIP_HUB_TIMEOUT (default 30).
    """

    kind = "hub"

    def __init__(self, *, token: str | None = None, endpoint: str | None = None,
                 cache_dir: Path | None = None, retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 30.0, timeout: float | None = None):
        from huggingface_hub import HfApi, constants
        from huggingface_hub.utils import get_token

        super().__init__(cache_dir or Path(constants.HF_HOME) / "fedbip")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout}.")
        self.timeout = float(timeout) if timeout is not None else _env_timeout()
        self.retries = max(1, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(0.0, float(max_backoff))
        self.api = HfApi(endpoint=endpoint, token=token)
        self.endpoint = self.api.endpoint.rstrip("/")
        self._token = token
        self._secrets = [s for s in (token, get_token()) if s]
        _install_timeout_hook()

    def describe(self) -> str:
        return f"Hub at {self.endpoint}"

    # -- plumbing ------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return str(redact(text))

    def _once(self, fn: Callable[[], T]) -> T:
        """One attempt of ``fn`` with every HTTP request bounded by ``self.timeout``."""
        _install_timeout_hook()
        token = _REQUEST_TIMEOUT.set(self.timeout)
        try:
            return fn()
        finally:
            _REQUEST_TIMEOUT.reset(token)

    def _sleep(self, attempt: int, exc: BaseException | None = None) -> None:
        delay = _retry_after(exc) if exc is not None else None
        if delay is None:
            delay = self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
        time.sleep(min(delay, self.max_backoff))

    def _call(self, repo_id: str, action: str, fn: Callable[[], T]) -> T:
        """``fn`` with retries on transient failures; any failure becomes a StoreError."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._once(fn)
            except Exception as exc:
                if _is_transient(exc) and attempt < self.retries:
                    self._sleep(attempt, exc)
                    continue
                error = self._translate(exc, repo_id, action, attempts=attempt)
                if error is None:
                    raise
                raise error from None

    def _translate(self, exc: BaseException, repo_id: str, action: str, *,
                   attempts: int = 1) -> StoreError | None:
        """Our error for a huggingface_hub / httpx2 failure (None: not one of those)."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            FileMetadataError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, FedbipError):
            return None
        root = _root_cause(exc)
        status = _status(root)
        if isinstance(root, GatedRepoError):
            return AuthError(f"{action}: {repo_id} is gated and this token has no access.",
                             hint="Accept the repo's conditions on the Hub with this account.")
        if isinstance(root, RepositoryNotFoundError):
            return NotFoundError(
                f"{action}: repo {repo_id} not found on {self.endpoint}, or your token cannot "
                "see it.",
                hint="Check the repo id, and that your token has read access to it "
                "(private repos answer 404 to outsiders).")
        if isinstance(root, RevisionNotFoundError):
            return NotFoundError(f"{action}: revision not found in {repo_id}.",
                                 hint="Use a commit id from the repo's history.")
        if isinstance(root, EntryNotFoundError) and not isinstance(root, LocalEntryNotFoundError):
            return NotFoundError(f"{action}: file not found in {repo_id}.",
                                 hint="Check that the file was pushed.")
        if status == 401:
            return AuthError(
                f"{action}: the Hub rejected the token (401: invalid, expired or revoked).",
                hint="Create a new token at https://huggingface.co/settings/tokens and run "
                "`hf auth login` or set HF_TOKEN.")
        if status == 403:
            return AuthError(
                f"{action}: the token has no rights for this on {repo_id} (403).",
                hint="Give the token write access to this repo (a fine-grained token scoped "
                "to it, or membership of its org), or use a token that has it.")
        if status == 412:
            return ConflictError(f"{action}: {repo_id} moved while we were writing (412).",
                                 hint="Another writer committed first; re-read and retry.")
        if isinstance(root, OfflineModeIsEnabled):
            return StoreError(f"{action} on {repo_id}: huggingface_hub is in offline mode.",
                              hint="Unset HF_HUB_OFFLINE to reach the Hub.")
        if isinstance(root, FileMetadataError):
            return StoreError(
                f"{action} on {repo_id}: {self.endpoint} answered without the Hub's file "
                "metadata (ETag / X-Repo-Commit).",
                hint="Check that HF_ENDPOINT points at a Hub-compatible server, and your "
                "proxy settings.")
        if _is_transient(exc):
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            return StoreError(
                f"{action} on {repo_id} failed{tries}: "
                f"{_describe_transient(exc, self.timeout)} from {self.endpoint}.",
                hint=_UNAVAILABLE_HINT)
        if isinstance(root, HfHubHTTPError):
            return StoreError(
                f"{action} on {repo_id} failed (HTTP {status}): "
                f"{self._scrub(_server_message(root))}",
                hint="The Hub refused the request; check the repo id and your token, or "
                "retry later if the Hub is having problems.")
        return None  # not a Hub or network failure: the caller re-raises it as it is

    def _api_url(self, repo_id: str, *parts: str) -> str:
        return "/".join([f"{self.endpoint}/api/models/{repo_id}", *parts])

    def _get_pages(self, url: str, params: dict[str, str] | None = None, *,
                   max_pages: int | None = None) -> list[Any]:
        """GET a (possibly paginated) JSON list, one attempt per page, no library retries."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(token=self._token)
        items: list[Any] = []
        next_url: str | None = url
        pages = 0
        while next_url is not None and (max_pages is None or pages < max_pages):
            response = get_session().get(next_url, headers=headers,
                                         params=params if next_url == url else None)
            hf_raise_for_status(response)
            items.extend(response.json())
            pages += 1
            next_url = response.links.get("next", {}).get("url")
        return items

    # -- Store API -----------------------------------------------------------------------
    def whoami(self) -> str:
        info = self._call("(whoami)", "whoami", lambda: self.api.whoami())
        return str(info.get("name", "unknown"))

    def create_repo(self, repo_id: str, *, private: bool = True) -> None:
        # Safe to retry: a repeat of an applied create answers 409, which exist_ok accepts.
        self._call(repo_id, "create repo",
                   lambda: self.api.create_repo(repo_id, private=private, exist_ok=True))

    def repo_exists(self, repo_id: str) -> bool:
        return bool(self._call(repo_id, "check repo", lambda: self.api.repo_exists(repo_id)))

    def delete_repo(self, repo_id: str) -> None:
        # Idempotent (missing_ok), so safe to retry.
        self._call(repo_id, "delete repo",
                   lambda: self.api.delete_repo(repo_id, missing_ok=True))

    @property
    def token(self) -> str | None:
        return self._token

    def is_private(self, repo_id: str) -> bool:
        info = self._call(repo_id, "read repo settings",
                          lambda: self.api.repo_info(repo_id, expand=["private"]))
        return bool(info.private)

    def make_private(self, repo_id: str) -> None:
        # PUT /api/models/{repo_id}/settings: idempotent, so safe to retry.
        self._call(repo_id, "make the repo private",
                   lambda: self.api.update_repo_settings(repo_id, private=True))

    def head(self, repo_id: str) -> str:
        refs = self._call(repo_id, "read refs", lambda: self.api.list_repo_refs(repo_id))
        for branch in refs.branches:
            if branch.name == "main":
                return branch.target_commit
        raise NotFoundError(f"{repo_id} has no main branch.",
                            hint="Create the repo with `fedbip init` or `fedbip join`.")

    def _tree(self, repo_id: str, revision: str) -> dict[str, dict[str, Any]]:
        url = self._api_url(repo_id, "tree", quote(revision, safe=""))
        entries = self._call(repo_id, "list files",
                             lambda: self._get_pages(url, {"recursive": "true"}))
        return {e["path"]: e for e in entries if e.get("type") == "file"}

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        return sorted(self._tree(repo_id, revision))

    def _commits(self, repo_id: str, revision: str = "main", *,
                 max_pages: int | None = None) -> list[dict[str, Any]]:
        url = self._api_url(repo_id, "commits", quote(revision, safe=""))
        return self._call(repo_id, "read history",
                          lambda: self._get_pages(url, max_pages=max_pages))

    def history(self, repo_id: str) -> list[CommitInfo]:
        return [CommitInfo(c["id"], c.get("title", ""), _iso_date(c.get("date", "")))
                for c in self._commits(repo_id)]

    def commit(self, repo_id: str, files: Mapping[str, FileContent], *, message: str,
               parent: str | None = None, deletes: Sequence[str] = ()) -> str:
        payload = {path.strip("/"): content.read_bytes() if isinstance(content, Path)
                   else bytes(content) for path, content in files.items()}
        title, _, body = message.partition("\n")
        title = title.strip() or "Update files"
        write_id = uuid.uuid4().hex
        description = "\n\n".join(p for p in (body.strip(), f"{WRITE_ID_TRAILER}: {write_id}")
                                  if p)
        first_base: str | None = None
        ambiguous = False  # an attempt may have been applied although we got no reply
        failure: BaseException | None = None
        for attempt in range(1, self.retries + 1):
            base = self.head(repo_id)
            first_base = first_base or base
            if ambiguous and (applied := self._find_write(repo_id, first_base, write_id)):
                return applied
            if parent is not None and parent != base:
                raise ConflictError(
                    f"commit: {repo_id} moved: expected parent {parent[:8]}, main is "
                    f"{base[:8]}.", hint="Another writer committed first; re-read and retry.")
            operations, upload = self._operations(repo_id, base, payload, deletes)
            if operations is None:
                return base
            try:
                info = self._once(functools.partial(
                    self.api.create_commit, repo_id, operations=operations(),
                    commit_message=title, commit_description=description, parent_commit=base))
            except Exception as exc:
                error = self._translate(exc, repo_id, "commit", attempts=attempt)
                if error is None:
                    raise
                if isinstance(error, ConflictError):  # 412: main moved after we read it
                    if ambiguous and (applied := self._find_write(repo_id, first_base,
                                                                  write_id)):
                        return applied
                    if parent is not None:
                        raise error from None
                    failure = exc  # no parent asked for: rebuild on the new head
                    continue
                if not _is_transient(exc):
                    raise error from None
                # No blind retry: the commit may have been applied with the reply lost.
                ambiguous, failure = True, exc
                if attempt < self.retries:
                    self._sleep(attempt, exc)
                continue
            if self._carries(repo_id, str(info.oid), write_id):
                self.traffic.uploaded += upload
                return str(info.oid)
            # HfApi sends no commit when, at preupload time, main already holds every
            # change (it then returns main's head, skipping the parent check): someone
            # else moved main. Treat it like a 412.
            if ambiguous and (applied := self._find_write(repo_id, first_base, write_id)):
                return applied
            if parent is not None:
                raise ConflictError(
                    f"commit: {repo_id} moved past {parent[:8]} while we were writing.",
                    hint="Another writer committed first; re-read and retry.")
            failure = ConflictError("main moved")
        if ambiguous and (applied := self._find_write(repo_id, first_base or "", write_id)):
            return applied
        assert failure is not None
        if _is_transient(failure):
            raise self._translate(failure, repo_id, "commit",
                                  attempts=self.retries) or StoreError("commit failed")
        raise ConflictError(f"commit: {repo_id} kept moving under us ({self.retries} tries).",
                            hint="Other writers are very busy on this repo; retry later.")

    def _operations(self, repo_id: str, base: str, payload: Mapping[str, bytes],
                    deletes: Sequence[str]) -> tuple[Callable[[], list[Any]] | None, int]:
        """The operations that change ``base`` (a factory, as HfApi marks them used; None
        when nothing changes) and the bytes they upload. Deletes of absent paths and
        unchanged files are dropped."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        tree = self._tree(repo_id, base)
        remaining = set(tree)
        delete_specs: list[tuple[str, bool]] = []
        for raw in deletes:
            path = raw.strip("/")
            if not path:
                continue
            if path in remaining:
                delete_specs.append((path, False))
                remaining.discard(path)
            below = {p for p in remaining if p.startswith(path + "/")}
            if below:
                delete_specs.append((path + "/", True))
                remaining -= below
        adds = {path: data for path, data in payload.items()
                if path not in remaining or not _same_content(tree[path], data)}

        def build() -> list[Any]:
            ops: list[Any] = [CommitOperationDelete(path_in_repo=p, is_folder=folder)
                              for p, folder in delete_specs]
            ops += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d)
                    for p, d in adds.items()]
            return ops

        if not delete_specs and not adds:
            return None, 0
        return build, sum(len(d) for d in adds.values())

    @staticmethod
    def _has_write_id(entry: Mapping[str, Any], write_id: str) -> bool:
        text = f"{entry.get('title', '')}\n{entry.get('message', '')}"
        return f"{WRITE_ID_TRAILER}: {write_id}" in text

    def _carries(self, repo_id: str, commit_id: str, write_id: str) -> bool:
        """Whether ``commit_id`` is the commit we wrote (read by id: no index lag).

        When the check itself cannot be made, the answer is yes: the commit POST succeeded,
        and HfApi's skip-the-commit path that this guards against is rare."""
        try:
            entries = self._commits(repo_id, commit_id, max_pages=1)
        except StoreError:
            return True
        return bool(entries) and entries[0].get("id") == commit_id and \
            self._has_write_id(entries[0], write_id)

    def _find_write(self, repo_id: str, since: str, write_id: str) -> str | None:
        """The id of the commit after ``since`` on main that carries ``write_id``, if any."""
        for entry in self._commits(repo_id, max_pages=1):
            if entry.get("id") == since:
                return None
            if self._has_write_id(entry, write_id):
                return str(entry["id"])
        return None

    def _download(self, repo_id: str, path: str, revision: str, dest: Path) -> None:
        """One GET of the resolve URL, streamed to ``dest``.

        Not hf_hub_download: when its HEAD fails with nothing cached it retries for about
        23 s (1, 2, 4, 8, 8 s) before giving up with a LocalEntryNotFoundError that hides
        the status (a 403 included), and then keeps a second copy in its own cache.
        """
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)

        def fetch() -> None:
            headers = build_hf_headers(token=self._token)
            with get_session().stream("GET", url, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                with dest.open("wb") as handle:
                    for chunk in response.iter_bytes(1 << 20):
                        handle.write(chunk)
                expected = response.headers.get("Content-Length")
                received = response.num_bytes_downloaded
                if expected is not None and expected.isdigit() and int(expected) != received:
                    raise OSError(f"Consistency check failed: {path} should be {expected} "
                                  f"bytes, got {received}.")

        self._call(repo_id, f"download {path}", fetch)


def _same_content(entry: Mapping[str, Any], data: bytes) -> bool:
    """Whether a tree entry (regular or LFS) holds exactly ``data``."""
    import hashlib

    lfs = entry.get("lfs")
    if isinstance(lfs, Mapping) and lfs.get("oid"):
        return bool(lfs["oid"] == hashlib.sha256(data).hexdigest())
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return bool(entry.get("oid") == blob)


def _iso_date(value: str) -> str:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return value
