"""What the test Hub stores: commits (full snapshots), repos with their refs, and tokens.

Plain data with no HTTP and no locking: the server's mixins hold the lock while they
read or change it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

DEFAULT_BRANCH = "main"
_REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

_HEX_PREFIX = re.compile(r"[0-9a-f]{7,40}")
_PR_REF = re.compile(r"refs/pr/(\d+)")


def git_blob_oid(data: bytes) -> str:
    """Git's blob id (sha1 of `blob <len>\\0<data>`): the Hub's ETag for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(moment: datetime) -> str:
    """Format a datetime the way the Hub does (`2024-01-02T03:04:05.678Z`)."""
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now() -> datetime:
    return datetime.now(timezone.utc)


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
