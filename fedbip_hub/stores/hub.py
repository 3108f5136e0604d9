"""The Hugging Face Hub as a store, through huggingface_hub's HfApi.

Private repos, one ``create_commit`` per logical write with ``parent_commit`` for
optimistic concurrency, every read pinned to a commit id. HF_ENDPOINT and HF_TOKEN are
honoured because HfApi reads them; the token never appears in our messages.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from fedbip_hub.errors import AuthError, ConflictError, NotFoundError, StoreError
from fedbip_hub.secrets import redact
from fedbip_hub.stores.base import CommitInfo, FileContent, Store

T = TypeVar("T")
TRANSIENT_STATUS = {429, 500, 502, 503, 504}


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    import httpx2

    if isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError | TimeoutError):
        return True
    return _status(exc) in TRANSIENT_STATUS


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class HubStore(Store):
    """Repos on a Hub (the real one, or any Hub-compatible endpoint).

    Args:
        token: a token; None uses HF_TOKEN or the stored login (huggingface_hub's get_token).
        endpoint: None uses HF_ENDPOINT.
        retries: attempts for transient failures (5xx, 429, timeouts), with backoff.
    """

    kind = "hub"

    def __init__(self, *, token: str | None = None, endpoint: str | None = None,
                 cache_dir: Path | None = None, retries: int = 4, backoff: float = 0.5):
        from huggingface_hub import HfApi, constants

        super().__init__(cache_dir or Path(constants.HF_HOME) / "fedbip")
        self.api = HfApi(endpoint=endpoint, token=token)
        self.endpoint = self.api.endpoint
        self.retries = retries
        self.backoff = backoff
        self._token = token

    def describe(self) -> str:
        return f"Hub at {self.endpoint}"

    # -- error mapping and retries -------------------------------------------------------
    @contextmanager
    def _errors(self, repo_id: str, action: str) -> Iterator[None]:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            yield
        except RepositoryNotFoundError as exc:
            raise NotFoundError(
                f"{action}: repo {repo_id} not found on {self.endpoint}, or your token cannot "
                "see it.",
                hint="Check the repo id, and that your token has read access to it "
                "(private repos answer 404 to outsiders).") from exc
        except RevisionNotFoundError as exc:
            raise NotFoundError(f"{action}: revision not found in {repo_id}.",
                                hint="Use a commit id from the repo's history.") from exc
        except EntryNotFoundError as exc:
            raise NotFoundError(f"{action}: file not found in {repo_id}.",
                                hint="Check that the file was pushed.") from exc
        except HfHubHTTPError as exc:
            status = _status(exc)
            if status == 401:
                raise AuthError(
                    f"{action}: the Hub rejected the token (401: invalid or revoked).",
                    hint="Create a new token at https://huggingface.co/settings/tokens and "
                    "run `hf auth login` or set HF_TOKEN.") from None
            if status == 403:
                raise AuthError(
                    f"{action}: the token may not write to {repo_id} (403).",
                    hint="Give the token write access to this repo (a fine-grained token "
                    "scoped to it, or membership of its org).") from None
            if status == 412:
                raise ConflictError(f"{action}: {repo_id} moved while we were writing (412).",
                                    hint="Another writer committed first; re-read and "
                                    "retry.") from None
            raise StoreError(f"{action} on {repo_id} failed: {redact(str(exc))}".strip(),
                             hint="The Hub may be unavailable; retry later.") from None

    def _call(self, repo_id: str, action: str, fn: Callable[[], T], *,
              retry: bool = True) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._errors(repo_id, action):
                    try:
                        return fn()
                    except Exception as exc:
                        if not (retry and attempt < self.retries and _is_transient(exc)):
                            raise
                        delay = _retry_after(exc) or self.backoff * 2 ** (attempt - 1)
                        time.sleep(min(delay, 30.0) * (1 + 0.1 * random.random()))
                        continue
            except StoreError:
                raise
            except Exception as exc:
                if _is_transient(exc):
                    raise StoreError(f"{action} on {repo_id} kept failing: "
                                     f"{type(exc).__name__}",
                                     hint="The Hub may be unavailable; retry later.") from None
                raise

    # -- Store API -----------------------------------------------------------------------
    def whoami(self) -> str:
        info = self._call("(whoami)", "whoami", lambda: self.api.whoami())
        return str(info.get("name", "unknown"))

    def create_repo(self, repo_id: str, *, private: bool = True) -> None:
        self._call(repo_id, "create repo",
                   lambda: self.api.create_repo(repo_id, private=private, exist_ok=True))

    def repo_exists(self, repo_id: str) -> bool:
        return bool(self._call(repo_id, "check repo", lambda: self.api.repo_exists(repo_id)))

    def head(self, repo_id: str) -> str:
        refs = self._call(repo_id, "read refs", lambda: self.api.list_repo_refs(repo_id))
        for branch in refs.branches:
            if branch.name == "main":
                return branch.target_commit
        raise NotFoundError(f"{repo_id} has no main branch.",
                            hint="Create the repo with `fedbip init` or `fedbip join`.")

    def commit(self, repo_id: str, files: Mapping[str, FileContent], *, message: str,
               parent: str | None = None, deletes: Sequence[str] = ()) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations: list = [CommitOperationDelete(path_in_repo=p) for p in deletes]
        for path, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else bytes(content)
            self.traffic.uploaded += len(data)
            operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=data))
        title, _, body = message.partition("\n")
        # No blind retry: a lost reply to an applied commit would then look like a 412.
        info = self._call(repo_id, "commit", lambda: self.api.create_commit(
            repo_id, operations=operations, commit_message=title,
            commit_description=body.strip() or None, parent_commit=parent), retry=False)
        return info.oid

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        return sorted(self._call(repo_id, "list files",
                                 lambda: self.api.list_repo_files(repo_id, revision=revision)))

    def history(self, repo_id: str) -> list[CommitInfo]:
        commits = self._call(repo_id, "read history",
                             lambda: self.api.list_repo_commits(repo_id))
        return [CommitInfo(c.commit_id, c.title, c.created_at.isoformat()) for c in commits]

    def _download(self, repo_id: str, path: str, revision: str, dest: Path) -> None:
        from huggingface_hub import hf_hub_download

        def fetch() -> str:
            return hf_hub_download(repo_id, path, revision=revision, token=self._token,
                                   endpoint=self.endpoint,
                                   cache_dir=self.cache_dir / "hf-cache")

        shutil.copyfile(self._call(repo_id, f"download {path}", fetch), dest)
