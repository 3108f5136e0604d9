"""Repos and their refs: creation and deletion (over HTTP and directly from a test),
visibility settings, branches, tags, the refs listing, and revision lookups.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections.abc import Mapping

from fedbip_hub.testing.hub_server.lfs import _GITATTRIBUTES
from fedbip_hub.testing.hub_server.state import (
    _URL_PREFIX,
    DEFAULT_BRANCH,
    Commit,
    _now,
    _Repo,
)
from fedbip_hub.testing.hub_server.transport import (
    _HubError,
    _json_response,
    _Request,
    _Response,
)

_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class RepoAdmin:
    """`HubServer`'s repos: set-up without HTTP, and the repo and ref routes."""

    _lock: threading.RLock
    _repos: dict[tuple[str, str], _Repo]
    _counter: itertools.count[int]
    user: str
    endpoint: str
    gitattributes: bool

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

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

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

    def _settings(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        body = request.json()
        with self._lock:
            if "private" in body:
                repo.private = bool(body["private"])
            if body.get("visibility") in ("public", "private"):
                repo.private = body["visibility"] == "private"
        return _json_response({})

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
