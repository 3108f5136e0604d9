"""Listings, with the call budget in mind: a commit's file tree is cached by commit id, in
memory and on disk beside the downloads (a commit never changes, so every store sharing
the cache reuses it), and ``heads`` learns many repos' heads from one listing per owner.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedbip_hub.errors import StoreError
from fedbip_hub.stores.base import RepoHead
from fedbip_hub.stores.hub.calls import HubCalls

_COMMIT_ID = re.compile(r"[0-9a-f]{40}")


class HubTrees(HubCalls):
    """File trees by commit id, and repo heads by owner listing."""

    _trees: dict[tuple[str, str], dict[str, dict[str, Any]]]

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


def _common_prefix(names: Sequence[str]) -> str:
    """The longest string every name starts with (the listing's ``search``)."""
    first, last = min(names), max(names)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]
