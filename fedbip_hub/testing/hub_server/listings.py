"""Repo info and repo listings (`list_models` / `list_datasets` with `author`, `search`,
`limit` and `expand`), paged by `Link` headers as the real Hub pages them.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlencode

from fedbip_hub.testing.hub_server.state import (
    _REPO_KINDS,
    DEFAULT_BRANCH,
    Commit,
    _iso,
    _Repo,
    git_blob_oid,
)
from fedbip_hub.testing.hub_server.transport import (
    _HubError,
    _json_response,
    _Request,
    _Response,
)

# What `expand=` may ask of a repo listing (the fields _info_payload has).
_LIST_EXPANDABLE = frozenset({
    "author", "sha", "lastModified", "createdAt", "private", "gated", "disabled",
    "downloads", "likes", "tags", "siblings", "usedStorage", "library_name",
})


class Listings:
    """`HubServer`'s repo-info and repo-listing routes."""

    _lock: threading.RLock
    _repos: dict[tuple[str, str], _Repo]
    endpoint: str
    list_page_size: int

    def _repo_info(
        self, request: _Request, repo_type: str, repo_id: str, rev: str = DEFAULT_BRANCH
    ) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        with self._lock:
            commit = self._resolve_or_404(repo, rev)
        return _json_response(self._info_payload(repo, commit, request.flag("blobs")))

    def _list_repos(self, request: _Request, kind: str) -> _Response:
        """`list_models` / `list_datasets`, as the real Hub answers them: filters `author`
        and `search` (a case-insensitive substring of the id), `limit`, and `expand`
        (repeated `expand=` or `expand[]=`): with it, each item carries `_id`, `id` and
        only the fields asked for. Without `limit`, pages of `list_page_size` items
        linked by a `Link: <...&cursor=N>; rel="next"` header, which huggingface_hub's
        paginate follows."""
        repo_type = _REPO_KINDS[kind]
        author = request.query.get("author", [None])[-1]
        search = (request.query.get("search", [""])[-1] or "").lower()
        limit = int(request.query.get("limit", ["0"])[-1] or 0)
        expand = request.query.get("expand", []) + request.query.get("expand[]", [])
        unknown = sorted(set(expand) - _LIST_EXPANDABLE)
        if unknown:
            raise _HubError(400, f"Invalid expand value(s): {', '.join(unknown)}")
        try:
            cursor = int(request.query.get("cursor", ["0"])[-1] or 0)
        except ValueError as err:
            raise _HubError(400, "Invalid cursor") from err
        caller = request.caller
        with self._lock:
            repos = [
                repo
                for (kind_, _), repo in sorted(self._repos.items())
                if kind_ == repo_type
                and (not repo.private or (caller and caller.owns(repo.namespace)))
                and (author is None or repo.namespace == author)
                and search in repo.repo_id.lower()
            ]
            heads = [repo.commits[repo.branches[DEFAULT_BRANCH]] for repo in repos]
        size = limit if limit > 0 else self.list_page_size
        page = list(zip(repos, heads, strict=True))[cursor:cursor + size]
        payload = [self._info_payload(r, c, False) for r, c in page]
        if expand:
            keep = {"_id", "id", *expand}
            payload = [{k: v for k, v in item.items() if k in keep} for item in payload]
        headers: dict[str, str] = {}
        if limit <= 0 and cursor + size < len(repos):
            query = [(k, v) for k, values in request.query.items() if k != "cursor"
                     for v in values] + [("cursor", str(cursor + size))]
            link = f"{self.endpoint}/api/{kind}?{urlencode(query)}"
            headers["Link"] = f'<{link}>; rel="next"'
        return _json_response(payload, headers=headers)

    @staticmethod
    def _info_payload(repo: _Repo, commit: Commit, with_blobs: bool) -> dict[str, Any]:
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                data = commit.files[path]
                sibling.update(size=len(data), blobId=git_blob_oid(data))
            siblings.append(sibling)
        payload: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        if repo.repo_type == "model":
            payload["library_name"] = "peft" if "adapter_config.json" in commit.files else None
        return payload
