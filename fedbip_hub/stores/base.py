"""The storage protocol every backend implements: repos of files with commit history."""

from __future__ import annotations

import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FileContent = bytes | Path
# Rounds download on a thread pool; byte counters are updated under this lock.
_TRAFFIC_LOCK = threading.Lock()


@dataclass(frozen=True)
class CommitInfo:
    """One commit of a repo's main branch."""

    id: str
    title: str
    date: str


@dataclass
class Traffic:
    """Bytes moved and requests made, for round records and benchmarks.

    ``api_calls`` and ``downloads`` count HTTP requests as the Hub's rate limits do (API
    calls, commits included, and file downloads); a local store makes none.
    """

    downloaded: int = 0
    uploaded: int = 0
    api_calls: int = 0
    downloads: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"api_calls": self.api_calls, "downloads": self.downloads,
                "downloaded_bytes": self.downloaded, "uploaded_bytes": self.uploaded}


@dataclass(frozen=True)
class RepoHead:
    """A repo's head as a listing of many repos shows it."""

    sha: str
    private: bool | None = None  # None: the listing does not say


class Store(ABC):
    """Repos addressed by id, each a main branch of commits with 40-hex ids.

    Every read takes a commit id (pinned); writes are single atomic commits that fail with
    ConflictError when ``parent`` is given and the branch has moved.
    """

    kind: str = "abstract"
    # time.monotonic() by which a call must give up rather than wait out a rate limit
    # (a round sets it from its lease and job timeout); None: no deadline.
    deadline: float | None = None

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.traffic = Traffic()

    @abstractmethod
    def whoami(self) -> str:
        """The user (or bot) this store writes as."""

    @abstractmethod
    def create_repo(self, repo_id: str, *, private: bool = True) -> None:
        """Create a repo (private by default); an existing one is left as it is."""

    @abstractmethod
    def repo_exists(self, repo_id: str) -> bool: ...

    @abstractmethod
    def delete_repo(self, repo_id: str) -> None:
        """Delete a repo this process created (a failed ``fedbip init`` undoing itself)."""

    @property
    def token(self) -> str | None:
        """The token given for this store's Hub calls (None: the environment's), which
        model and tokenizer downloads reuse."""
        return None

    @abstractmethod
    def is_private(self, repo_id: str) -> bool:
        """Whether only its owner (and those it grants) can read the repo."""

    @abstractmethod
    def make_private(self, repo_id: str) -> None:
        """Make an existing repo private (``create_repo`` never changes an existing one)."""

    @abstractmethod
    def head(self, repo_id: str) -> str:
        """The commit id main points to. Raises NotFoundError for a missing repo."""

    def heads(self, repo_ids: Sequence[str]) -> dict[str, RepoHead]:
        """The heads of many repos in as few calls as the store allows (a listing per
        owner on the Hub). A repo missing from the answer was not seen: ask it with
        ``head``. The default lists nothing, so callers ask each repo.

        A listing may lag a write by a moment; callers use it only to tell which repos
        moved, and read a moved repo's head exactly.
        """
        return {}

    def check_revision(self, repo_id: str, revision: str, probe: str) -> None:
        """Raise NotFoundError unless ``revision`` still exists, asking the store itself,
        never a cache. ``probe`` is a file the revision is expected to hold (a store may
        ask for it alone; its absence alone does not count as the revision gone)."""
        self.list_files(repo_id, revision)

    @abstractmethod
    def commit(self, repo_id: str, files: Mapping[str, FileContent], *, message: str,
               parent: str | None = None, deletes: Sequence[str] = ()) -> str:
        """Write files in one atomic commit and return its id.

        A commit that changes nothing returns the current head and makes no commit.

        Raises:
            ConflictError: ``parent`` is given and main has moved past it.
        """

    @abstractmethod
    def list_files(self, repo_id: str, revision: str) -> list[str]: ...

    @abstractmethod
    def history(self, repo_id: str) -> list[CommitInfo]:
        """Commits of main, newest first."""

    @abstractmethod
    def _download(self, repo_id: str, path: str, revision: str, dest: Path) -> None:
        """Copy one pinned file to ``dest``."""

    def read_bytes(self, repo_id: str, path: str, revision: str) -> bytes:
        """One file's content at a pinned revision (small files: JSON, metadata)."""
        target = self._cache_path(repo_id, revision) / path
        if not target.is_file():
            self._download_atomic(repo_id, path, revision, target)
        return target.read_bytes()

    def file_exists(self, repo_id: str, path: str, revision: str) -> bool:
        return path in self.list_files(repo_id, revision)

    def fetch_folder(self, repo_id: str, revision: str, subfolder: str = "",
                     *, only: Sequence[str] | None = None) -> Path:
        """Materialise a pinned folder of a repo in the cache and return its path.

        A revision is a commit id, so the cache never goes stale: an unchanged input is
        never downloaded twice.
        """
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        root = self._cache_path(repo_id, revision)
        wanted = [f for f in self.list_files(repo_id, revision)
                  if f.startswith(prefix) and "/" not in f[len(prefix):]
                  and (only is None or f[len(prefix):] in only)]
        for path in wanted:
            target = root / path
            if not target.is_file():
                self._download_atomic(repo_id, path, revision, target)
        folder = root / prefix if prefix else root
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _download_atomic(self, repo_id: str, path: str, revision: str, target: Path) -> None:
        """Download to a private temporary name, then rename: readers (other processes
        sharing the cache included) never see a partial file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        # A short name: ``target``'s own may already be near the 255-byte limit.
        partial = target.with_name(f".{uuid.uuid4().hex}.partial")
        try:
            self._download(repo_id, path, revision, partial)
            size = partial.stat().st_size
            with _TRAFFIC_LOCK:
                self.traffic.downloaded += size
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)

    def _cache_path(self, repo_id: str, revision: str) -> Path:
        return self.cache_dir / self.kind / repo_id.replace("/", "--") / revision

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache_dir / self.kind, ignore_errors=True)

    def describe(self) -> str:
        return self.kind
