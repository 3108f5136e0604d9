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
- A 429 whose ``RateLimit`` header says the quota is spent (the IETF draft the Hub
  follows, parsed by huggingface_hub's ``parse_ratelimit_headers``) is waited out until
  the quota resets, without using up an attempt, as long as the store's ``deadline`` (a
  round's lease and job timeout) and ``max_rate_wait`` allow; only then does the call fail.
- The call budget (see the README's Hub section): trees are cached by commit id on disk
  (a commit never changes), a commit made here also caches its own tree,
  a commit on a known parent sends only preupload and commit (no head or history read),
  pinned folders of known files are downloaded without a listing, and ``heads`` learns
  many repos' heads from one listing per owner. Every request is counted in
  ``traffic.api_calls`` / ``traffic.downloads``, as the Hub's rate limits count them.
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
import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from fedbip_hub.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    FedbipError,
    NotFoundError,
    StoreError,
)
from fedbip_hub.secrets import REDACTED, redact
from fedbip_hub.stores.base import (
    _TRAFFIC_LOCK,
    CommitInfo,
    FileContent,
    RepoHead,
    Store,
    Traffic,
)

T = TypeVar("T")
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")
DEFAULT_MAX_RATE_WAIT = 600.0  # the longest a call waits out rate limits without a deadline
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
# The same way, the HubStore call in progress counts its requests in its store's Traffic.
_REQUEST_TRAFFIC: contextvars.ContextVar[tuple[Traffic, str] | None] = contextvars.ContextVar(
    "fedbip_hub_request_traffic", default=None)
_HOOK_LOCK = threading.Lock()


def _timeout_hook(request: Any) -> None:
    timeout = _REQUEST_TIMEOUT.get()
    if timeout is not None:
        import httpx2

        request.extensions = {**request.extensions,
                              "timeout": httpx2.Timeout(timeout).as_dict()}
    counted = _REQUEST_TRAFFIC.get()
    if counted is not None:
        traffic, api_prefix = counted
        path = request.url.path
        with _TRAFFIC_LOCK:  # as the Hub's limits count: API calls and file downloads
            if path.startswith(api_prefix):
                traffic.api_calls += 1
            elif "/resolve/" in path:
                traffic.downloads += 1


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


def _rate_limit_wait(exc: BaseException) -> float | None:
    """Seconds a 429 asks us to wait until its quota resets, when its ``RateLimit``
    header says the quota is spent (huggingface_hub waits the same, plus 1 s for
    rounding); None otherwise (another 429 is retried like any transient failure,
    honouring ``Retry-After``)."""
    from huggingface_hub.utils import parse_ratelimit_headers

    root = _root_cause(exc)
    if _status(root) != 429:
        return None
    headers = getattr(getattr(root, "response", None), "headers", None)
    info = parse_ratelimit_headers(headers) if headers is not None else None
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds) + 1.0
    return None


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
                 max_backoff: float = 30.0, timeout: float | None = None,
                 max_rate_wait: float = DEFAULT_MAX_RATE_WAIT):
        from huggingface_hub import HfApi, constants
        from huggingface_hub.utils import get_token

        super().__init__(cache_dir or Path(constants.HF_HOME) / "fedbip")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout}.")
        self.timeout = float(timeout) if timeout is not None else _env_timeout()
        self.retries = max(1, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(0.0, float(max_backoff))
        self.max_rate_wait = max(0.0, float(max_rate_wait))
        self.api = HfApi(endpoint=endpoint, token=token)
        self.endpoint = self.api.endpoint.rstrip("/")
        self._token = token
        self._secrets = [s for s in (token, get_token()) if s]
        self._api_prefix = (urlsplit(self.endpoint).path.rstrip("/") or "") + "/api/"
        self._trees: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
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
        counting = _REQUEST_TRAFFIC.set((self.traffic, self._api_prefix))
        try:
            return fn()
        finally:
            _REQUEST_TRAFFIC.reset(counting)
            _REQUEST_TIMEOUT.reset(token)

    def _sleep(self, attempt: int, exc: BaseException | None = None) -> None:
        delay = _retry_after(exc) if exc is not None else None
        if delay is None:
            delay = self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
        time.sleep(min(delay, self.max_backoff))

    def _wait_out_rate_limit(self, exc: BaseException, waited: float, repo_id: str,
                             action: str) -> float | None:
        """Sleep out a 429's rate limit when the deadline allows and return the seconds
        waited; None when ``exc`` is no 429 that says how long. Raises StoreError when
        the quota resets too late for this job."""
        wait = _rate_limit_wait(exc)
        if wait is None:
            return None
        left = (self.deadline - time.monotonic()) if self.deadline is not None else None
        if waited + wait > self.max_rate_wait or (left is not None and wait > left):
            budget = f"{left:.0f} s left before this job's deadline" if left is not None \
                else f"waits are capped at {self.max_rate_wait:g} s"
            raise StoreError(
                f"{action} on {repo_id}: the Hub's rate limit is spent and resets in "
                f"{wait:.0f} s ({budget}).",
                hint="Run rounds less often (a webhook instead of a tight schedule), give "
                "the job a longer --timeout, or use an account with a higher quota (PRO, "
                "Team).") from None
        time.sleep(wait)
        return wait

    def _call(self, repo_id: str, action: str, fn: Callable[[], T]) -> T:
        """``fn`` with retries on transient failures and rate limits waited out (see the
        module docstring); any failure becomes a StoreError."""
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                return self._once(fn)
            except Exception as exc:
                slept = self._wait_out_rate_limit(exc, waited, repo_id, action)
                if slept is not None:  # a rate limit waited out is no failed attempt
                    waited += slept
                    attempt -= 1
                    continue
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
            return _EntryMissing(f"{action}: file not found in {repo_id}.",
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

    def _get_pages(self, url: str, params: Any = None, *,
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

    # -- trees, cached by commit id ------------------------------------------------------
    def _tree_file(self, repo_id: str, revision: str) -> Path:
        # Beside the revision folders (40-hex names), so no repo file can collide with it.
        return (self.cache_dir / self.kind / repo_id.replace("/", "--") / ".trees"
                / f"{revision}.json")

    def _cached_tree(self, repo_id: str, revision: str) -> dict[str, dict[str, Any]] | None:
        """The tree of a commit id listed before, by this store or another sharing the
        cache (a commit never changes); None when there is none."""
        if not _COMMIT_ID.fullmatch(revision):
            return None
        tree = self._trees.get((repo_id, revision))
        if tree is None:
            try:
                tree = json.loads(self._tree_file(repo_id, revision).read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(tree, dict):
                return None
            self._trees[(repo_id, revision)] = tree
        return tree

    def _remember_tree(self, repo_id: str, revision: str,
                       tree: dict[str, dict[str, Any]]) -> None:
        if not _COMMIT_ID.fullmatch(revision):
            return
        self._trees[(repo_id, revision)] = tree
        path = self._tree_file(repo_id, revision)
        partial = path.with_name(f".{uuid.uuid4().hex}.partial")
        try:  # atomic, as every cache write: readers sharing the cache see all or nothing
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(tree))
            partial.replace(path)
        except OSError:
            pass  # only a cache: the next reader lists the tree again
        finally:
            partial.unlink(missing_ok=True)

    def _tree(self, repo_id: str, revision: str) -> dict[str, dict[str, Any]]:
        if (tree := self._cached_tree(repo_id, revision)) is not None:
            return tree
        url = self._api_url(repo_id, "tree", quote(revision, safe=""))
        entries = self._call(repo_id, "list files",
                             lambda: self._get_pages(url, {"recursive": "true"}))
        tree = {e["path"]: e for e in entries if e.get("type") == "file"}
        self._remember_tree(repo_id, revision, tree)
        return tree

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        return sorted(self._tree(repo_id, revision))

    def check_revision(self, repo_id: str, revision: str, probe: str) -> None:
        """One HEAD of ``probe``'s resolve URL, never answered from a cache: a file
        request (the Hub counts it with downloads), not an API call. A revision that
        exists without ``probe`` answers EntryNotFound, which is no error here."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(repo_id, probe, revision=revision, endpoint=self.endpoint)

        def ask() -> None:
            response = get_session().head(url, headers=build_hf_headers(token=self._token),
                                          follow_redirects=False)
            if response.status_code >= 400:
                hf_raise_for_status(response)

        try:
            self._call(repo_id, "check a revision", ask)
        except _EntryMissing:
            return

    def fetch_folder(self, repo_id: str, revision: str, subfolder: str = "",
                     *, only: Sequence[str] | None = None) -> Path:
        """As ``Store.fetch_folder``; with ``only`` and no cached tree, each named file is
        downloaded straight away (a file the revision lacks answers 404 and is left out),
        so reading a pinned adapter costs downloads, not API calls."""
        if only is None or self._cached_tree(repo_id, revision) is not None:
            return super().fetch_folder(repo_id, revision, subfolder, only=only)
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        root = self._cache_path(repo_id, revision)
        for name in only:
            target = root / f"{prefix}{name}"
            if "/" in name or target.is_file():
                continue
            try:
                self._download_atomic(repo_id, f"{prefix}{name}", revision, target)
            except _EntryMissing:
                continue
        folder = root / prefix if prefix else root
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def heads(self, repo_ids: Sequence[str]) -> dict[str, RepoHead]:
        """One listing per owner (``list_models(author=owner, search=<the names' common
        prefix>, expand=[sha, private])``, paged by the Hub): K members of one org cost
        one call, not K. An owner whose listing fails, and a repo it does not show, are
        left out: the caller asks those one by one."""
        by_owner: dict[str, list[str]] = {}
        for repo_id in dict.fromkeys(repo_ids):
            owner, _, name = repo_id.partition("/")
            if name:
                by_owner.setdefault(owner, []).append(name)
        found: dict[str, RepoHead] = {}
        for owner, names in by_owner.items():
            params: list[tuple[str, str]] = [("author", owner), ("expand", "sha"),
                                             ("expand", "private")]
            if prefix := _common_prefix(names):
                params.append(("search", prefix))
            url = f"{self.endpoint}/api/models"
            try:
                items = self._call(owner, "list repos",
                                   functools.partial(self._get_pages, url, params))
            except StoreError:
                continue
            wanted = {f"{owner}/{name}" for name in names}
            for item in items:
                if not isinstance(item, dict) or item.get("id") not in wanted:
                    continue
                sha, private = item.get("sha"), item.get("private")
                if isinstance(sha, str) and _COMMIT_ID.fullmatch(sha):
                    found[item["id"]] = RepoHead(
                        sha, private if isinstance(private, bool) else None)
        return found

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
        """See ``Store.commit``. With ``parent`` the first attempt commits on it without
        reading the head (the Hub answers 412 when main moved), so a commit costs a
        preupload and the commit itself (its base tree is cached by commit id)."""
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
        known = parent  # a base to commit on without reading the head first
        attempt, waited = 0, 0.0
        while attempt < self.retries:
            attempt += 1
            base, known = (known, None) if known is not None else (self.head(repo_id), None)
            first_base = first_base or base
            if ambiguous and (applied := self._find_write(repo_id, first_base, write_id)):
                return applied
            if parent is not None and parent != base:
                raise ConflictError(
                    f"commit: {repo_id} moved: expected parent {parent[:8]}, main is "
                    f"{base[:8]}.", hint="Another writer committed first; re-read and retry.")
            adds, delete_specs = self._changes(repo_id, base, payload, deletes)
            listed = self._cached_tree(repo_id, base) is not None  # else sent unlisted
            if not adds and not delete_specs:
                if base == parent and self.head(repo_id) != base:  # unread: check it
                    raise ConflictError(f"commit: {repo_id} moved past {base[:8]}.",
                                        hint="Another writer committed first; re-read "
                                        "and retry.")
                return base
            operations = _build_operations(adds, delete_specs)
            try:
                info = self._once(functools.partial(
                    self.api.create_commit, repo_id, operations=operations,
                    commit_message=title, commit_description=description, parent_commit=base))
            except Exception as exc:
                slept = self._wait_out_rate_limit(exc, waited, repo_id, "commit")
                if slept is not None:  # refused before it was applied: again on this base
                    waited, attempt, known = waited + slept, attempt - 1, base
                    continue
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
            sent = _commit_sent(operations)
            if sent is None:  # cannot tell from HfApi's operations: ask the Hub
                sent = self._carries(repo_id, str(info.oid), write_id)
            if sent:  # sent with parent_commit=base and accepted: the commit is ours
                self.traffic.uploaded += _uploaded_bytes(operations, adds)
                self._after_commit(repo_id, base, str(info.oid), adds, delete_specs)
                return str(info.oid)
            if not listed and self.head(repo_id) == base:
                return base  # sent unlisted, and HfApi found every file unchanged: a no-op
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

    def _changes(self, repo_id: str, base: str, payload: Mapping[str, bytes],
                 deletes: Sequence[str]) -> tuple[dict[str, bytes], list[tuple[str, bool]]]:
        """The files that change ``base`` and the deletes (path, is_folder) it needs:
        deletes of absent paths and unchanged files are dropped. With no deletes and no
        cached tree of ``base`` every file is sent without listing it: HfApi's preupload
        leaves out the unchanged ones itself (``commit`` tells a no-op from a race)."""
        tree = self._cached_tree(repo_id, base)
        if tree is None and not any(raw.strip("/") for raw in deletes):
            return dict(payload), []
        tree = tree if tree is not None else self._tree(repo_id, base)
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
        return adds, delete_specs

    def _after_commit(self, repo_id: str, base: str, commit_id: str,
                      adds: Mapping[str, bytes], delete_specs: Sequence[tuple[str, bool]]
                      ) -> None:
        """Cache the tree of a commit we just made (``base``'s, with our changes: the Hub
        applied exactly those on ``base``), so listing it costs nothing."""
        known = self._cached_tree(repo_id, base)
        if known is None:
            return
        tree = dict(known)
        for path, folder in delete_specs:
            for existing in [p for p in tree if (p.startswith(path) if folder else p == path)]:
                del tree[existing]
        for path, data in adds.items():
            tree[path] = {"type": "file", "path": path, "size": len(data),
                          "oid": _git_blob_oid(data),
                          "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}}
        self._remember_tree(repo_id, commit_id, tree)

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


class _EntryMissing(NotFoundError):
    """A file the (existing) revision does not hold."""


def _build_operations(adds: Mapping[str, bytes], delete_specs: Sequence[tuple[str, bool]]
                      ) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = [CommitOperationDelete(path_in_repo=p, is_folder=folder)
                      for p, folder in delete_specs]
    ops += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in adds.items()]
    return ops


def _commit_sent(operations: Sequence[Any]) -> bool | None:
    """Whether ``create_commit`` sent the commit. HfApi skips it (returning main's head)
    only when every operation is an add whose preupload ``oid`` equals its own; None
    when this huggingface_hub keeps no such attributes."""
    from huggingface_hub import CommitOperationAdd

    if not all(isinstance(op, CommitOperationAdd) for op in operations):
        return True  # a delete is always sent
    try:
        return not all(op._remote_oid is not None and op._remote_oid == op._local_oid
                       for op in operations)
    except AttributeError:
        return None


def _uploaded_bytes(operations: Sequence[Any], adds: Mapping[str, bytes]) -> int:
    """The bytes of the adds HfApi did send (it drops those preupload found unchanged)."""
    unchanged = {op.path_in_repo for op in operations
                 if getattr(op, "_remote_oid", None) is not None
                 and op._remote_oid == getattr(op, "_local_oid", None)}
    return sum(len(data) for path, data in adds.items() if path not in unchanged)


def _common_prefix(names: Sequence[str]) -> str:
    """The longest string every name starts with (the listing's ``search``)."""
    first, last = min(names), max(names)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _same_content(entry: Mapping[str, Any], data: bytes) -> bool:
    """Whether a tree entry (regular or LFS) holds exactly ``data``."""
    lfs = entry.get("lfs")
    if isinstance(lfs, Mapping) and lfs.get("oid"):
        return bool(lfs["oid"] == hashlib.sha256(data).hexdigest())
    return bool(entry.get("oid") == _git_blob_oid(data))


def _iso_date(value: str) -> str:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return value
