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

The parts, each a base class of HubStore: ``client`` (the request hook), ``failures``
(what an error means), ``calls`` (retries and rate-limit waits), ``trees`` (listings and
the tree cache), ``reads`` (downloads) and ``commits``; this module manages repos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedbip_hub.errors import ConfigError, NotFoundError
from fedbip_hub.stores.hub.calls import DEFAULT_MAX_RATE_WAIT
from fedbip_hub.stores.hub.client import _env_timeout, _install_timeout_hook
from fedbip_hub.stores.hub.commits import HubCommits
from fedbip_hub.stores.hub.reads import HubReads


class HubStore(HubCommits, HubReads):
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

    @property
    def token(self) -> str | None:
        return self._token

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
