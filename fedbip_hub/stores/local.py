"""A local-folder store with the Hub's semantics: commit ids, history, optimistic writes.

Layout under the root: ``repos/<repo_id>/{objects/<sha256>, commits/<id>.json, HEAD,
meta.json, .lock}``. Blobs are content-addressed, commits are JSON snapshots of
path → blob, and main moves by an atomic rename under a file lock, so a crash at any
point leaves either the old or the new commit, never a mix.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fedbip_hub.errors import ConflictError, NotFoundError, StoreError
from fedbip_hub.stores.base import CommitInfo, FileContent, Store

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
MARKER = ".fedbip-store.json"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves no partial file behind
        tmp.unlink(missing_ok=True)


class LocalStore(Store):
    """Repos in a folder. ``root`` is created on first write."""

    kind = "local"

    def __init__(self, root: str | Path, *, cache_dir: Path | None = None,
                 user: str | None = None):
        self.root = Path(root).expanduser().resolve()
        super().__init__(cache_dir or self.root / ".cache")
        self.user = user or os.environ.get("FEDBIP_USER") or _login_name()

    def describe(self) -> str:
        return f"local folder {self.root}"

    # -- repo layout ---------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Path:
        if not _REPO_ID.match(repo_id) or ".." in repo_id:
            raise StoreError(f"invalid repo id {repo_id!r}.",
                             hint="Use letters, digits, '.', '_' and '-', optionally ns/name.")
        return self.root / "repos" / repo_id

    def _existing(self, repo_id: str) -> Path:
        repo = self._repo(repo_id)
        if not (repo / "HEAD").is_file():
            raise NotFoundError(f"repo {repo_id} does not exist in {self.root}.",
                                hint="Check the name, or create it (fedbip init / fedbip join).")
        return repo

    @contextmanager
    def _locked(self, repo: Path) -> Iterator[None]:
        with (repo / ".lock").open("a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _commit_record(self, repo: Path, commit_id: str) -> dict:
        path = repo / "commits" / f"{commit_id}.json"
        if not _COMMIT_ID.match(commit_id) or not path.is_file():
            raise NotFoundError(f"revision {commit_id} not found in {repo.name}.",
                                hint="Pass a commit id from the repo's history.")
        return json.loads(path.read_text())

    def _resolve(self, repo: Path, revision: str) -> dict:
        if revision in ("main", "HEAD"):
            revision = (repo / "HEAD").read_text().strip()
        return self._commit_record(repo, revision)

    # -- Store API -----------------------------------------------------------------------
    def whoami(self) -> str:
        return self.user

    def create_repo(self, repo_id: str, *, private: bool = True) -> None:
        repo = self._repo(repo_id)
        (repo / "objects").mkdir(parents=True, exist_ok=True)
        (repo / "commits").mkdir(exist_ok=True)
        marker = self.root / MARKER
        if not marker.exists():
            _atomic_write(marker, json.dumps({"fedbip_store": 1}).encode())
        with self._locked(repo):
            if (repo / "HEAD").is_file():
                return
            _atomic_write(repo / "meta.json", json.dumps({"private": private}).encode())
            initial = self._write_commit(repo, parent=None, tree={},
                                         message="initial commit")
            _atomic_write(repo / "HEAD", initial.encode())

    def repo_exists(self, repo_id: str) -> bool:
        return (self._repo(repo_id) / "HEAD").is_file()

    def delete_repo(self, repo_id: str) -> None:
        shutil.rmtree(self._repo(repo_id), ignore_errors=True)

    def is_private(self, repo_id: str) -> bool:
        meta = self._existing(repo_id) / "meta.json"
        return not meta.is_file() or json.loads(meta.read_text()).get("private") is not False

    def make_private(self, repo_id: str) -> None:
        repo = self._existing(repo_id)
        with self._locked(repo):
            _atomic_write(repo / "meta.json", json.dumps({"private": True}).encode())

    def head(self, repo_id: str) -> str:
        return (self._existing(repo_id) / "HEAD").read_text().strip()

    def commit(self, repo_id: str, files: Mapping[str, FileContent], *, message: str,
               parent: str | None = None, deletes: Sequence[str] = ()) -> str:
        repo = self._existing(repo_id)
        stored = {path.strip("/"): self._store_blob(repo, content)
                  for path, content in files.items()}
        with self._locked(repo):
            current = (repo / "HEAD").read_text().strip()
            if parent is not None and parent != current:
                raise ConflictError(
                    f"{repo_id} moved: expected parent {parent[:8]}, main is {current[:8]}.",
                    hint="Another writer committed first; re-read and retry.")
            before = self._commit_record(repo, current)["tree"]
            tree = dict(before)
            for path in deletes:
                path = path.strip("/")
                if not path:
                    continue
                prefix = path + "/"
                for existing in [p for p in tree if p == path or p.startswith(prefix)]:
                    del tree[existing]
            tree.update({path: digest for path, (digest, _) in stored.items()})
            if tree == before:
                return current
            commit_id = self._write_commit(repo, parent=current, tree=tree, message=message)
            _atomic_write(repo / "HEAD", commit_id.encode())
        # Like the Hub: only files that change the tree count as uploaded.
        self.traffic.uploaded += sum(size for path, (digest, size) in stored.items()
                                     if before.get(path) != digest)
        return commit_id

    def _store_blob(self, repo: Path, content: FileContent) -> tuple[str, int]:
        data = content.read_bytes() if isinstance(content, Path) else bytes(content)
        digest = hashlib.sha256(data).hexdigest()
        target = repo / "objects" / digest
        if not target.exists():
            _atomic_write(target, data)
        return digest, len(data)

    def _write_commit(self, repo: Path, *, parent: str | None, tree: dict[str, str],
                      message: str) -> str:
        title, _, body = message.partition("\n")
        record = {"parent": parent, "tree": dict(sorted(tree.items())), "title": title,
                  "message": body.strip(), "author": self.user,
                  "date": datetime.now(timezone.utc).isoformat(), "nonce": uuid.uuid4().hex}
        data = json.dumps(record, indent=1).encode()
        commit_id = hashlib.sha1(data).hexdigest()
        _atomic_write(repo / "commits" / f"{commit_id}.json", data)
        return commit_id

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        return sorted(self._resolve(self._existing(repo_id), revision)["tree"])

    def history(self, repo_id: str) -> list[CommitInfo]:
        repo = self._existing(repo_id)
        out: list[CommitInfo] = []
        commit_id: str | None = (repo / "HEAD").read_text().strip()
        while commit_id:
            record = self._commit_record(repo, commit_id)
            out.append(CommitInfo(commit_id, record["title"], record["date"]))
            commit_id = record["parent"]
        return out

    def _download(self, repo_id: str, path: str, revision: str, dest: Path) -> None:
        repo = self._existing(repo_id)
        tree = self._resolve(repo, revision)["tree"]
        if path not in tree:
            raise NotFoundError(f"{path} not found in {repo_id} at {revision[:8]}.",
                                hint="Check that the file was pushed.")
        shutil.copyfile(repo / "objects" / tree[path], dest)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local-user"
