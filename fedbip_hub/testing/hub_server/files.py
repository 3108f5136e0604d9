"""Reading a revision's files: tree listings and paths-info (with `lastCommit` on
request), and `resolve` downloads (HEAD and GET, with byte ranges).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, quote

from fedbip_hub.testing.hub_server.state import Commit, _iso, _Repo, git_blob_oid
from fedbip_hub.testing.hub_server.transport import (
    _header_safe,
    _HubError,
    _json_response,
    _Request,
    _Response,
)

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class FileReads:
    """`HubServer`'s tree, paths-info and resolve routes."""

    _lock: threading.RLock

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
