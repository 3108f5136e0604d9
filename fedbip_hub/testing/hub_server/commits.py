"""Commits: recording a snapshot on a branch (or as a pull request), the ndjson commit
route with its `parentCommit` check (HTTP 412), and the commit history route.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from fedbip_hub.testing.hub_server.state import Commit, _iso, _now, _Repo, git_blob_oid
from fedbip_hub.testing.hub_server.transport import (
    _HubError,
    _json_response,
    _Request,
    _Response,
)


class Commits:
    """`HubServer`'s commit routes (repo lookups and access checks come from its other parts)."""

    _lock: threading.RLock
    _counter: itertools.count[int]

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
