"""Commits: one ``create_commit`` per logical write, always sent with ``parent_commit``.

A commit on a known parent sends only preupload and the commit (its base tree is cached
by commit id, and the new commit's tree is cached too). HfApi's preupload may find every
file unchanged and skip the commit (the operations' ``_remote_oid``); that case is told
apart from a race. Each commit carries a write id in its description; after an
ambiguous failure the history is checked for it before trying again, so a commit whose
reply was lost is recognised instead of being applied twice or reported as a conflict.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedbip_hub.errors import ConflictError, StoreError
from fedbip_hub.stores.base import CommitInfo, FileContent
from fedbip_hub.stores.hub.failures import _is_transient
from fedbip_hub.stores.hub.trees import HubTrees

WRITE_ID_TRAILER = "Fedbip-Write-Id"


class HubCommits(HubTrees):
    """Commits and commit history of a HubStore."""

    def _commits(self, repo_id: str, revision: str = "main", *,
                 max_pages: int | None = None) -> list[dict[str, Any]]:
        url = self._api_url(repo_id, "commits", quote(revision, safe=""))
        return self._call(repo_id, "read history",
                          lambda: self._get_pages(url, max_pages=max_pages))

    def history(self, repo_id: str) -> list[CommitInfo]:
        return [CommitInfo(c["id"], c.get("title", ""), _iso_date(c.get("date", "")))
                for c in self._commits(repo_id)]

    def commit(self, repo_id: str, files: Mapping[str, FileContent], *, message: str,
               parent: str | None = None, deletes: Sequence[str] = ()) -> str:
        """See ``Store.commit``. With ``parent`` the first attempt commits on it without
        reading the head (the Hub answers 412 when main moved), so a commit costs a
        preupload and the commit itself (its base tree is cached by commit id)."""
        payload = {path.strip("/"): content.read_bytes() if isinstance(content, Path)
                   else bytes(content) for path, content in files.items()}
        title, _, body = message.partition("\n")
        title = title.strip() or "Update files"
        write_id = uuid.uuid4().hex
        description = "\n\n".join(p for p in (body.strip(), f"{WRITE_ID_TRAILER}: {write_id}")
                                  if p)
        first_base: str | None = None
        ambiguous = False  # an attempt may have been applied although we got no reply
        failure: BaseException | None = None
        known = parent  # a base to commit on without reading the head first
        attempt, waited = 0, 0.0
        while attempt < self.retries:
            attempt += 1
            base, known = (known, None) if known is not None else (self.head(repo_id), None)
            first_base = first_base or base
            if ambiguous and (applied := self._find_write(repo_id, first_base, write_id)):
                return applied
            if parent is not None and parent != base:
                raise ConflictError(
                    f"commit: {repo_id} moved: expected parent {parent[:8]}, main is "
                    f"{base[:8]}.", hint="Another writer committed first; re-read and retry.")
            adds, delete_specs = self._changes(repo_id, base, payload, deletes)
            listed = self._cached_tree(repo_id, base) is not None  # else sent unlisted
            if not adds and not delete_specs:
                if base == parent and self.head(repo_id) != base:  # unread: check it
                    raise ConflictError(f"commit: {repo_id} moved past {base[:8]}.",
                                        hint="Another writer committed first; re-read "
                                        "and retry.")
                return base
            operations = _build_operations(adds, delete_specs)
            try:
                info = self._once(functools.partial(
                    self.api.create_commit, repo_id, operations=operations,
                    commit_message=title, commit_description=description, parent_commit=base))
            except Exception as exc:
                slept = self._wait_out_rate_limit(exc, waited, repo_id, "commit")
                if slept is not None:  # refused before it was applied: again on this base
                    waited, attempt, known = waited + slept, attempt - 1, base
                    continue
                error = self._translate(exc, repo_id, "commit", attempts=attempt)
                if error is None:
                    raise
                if isinstance(error, ConflictError):  # 412: main moved after we read it
                    if ambiguous and (applied := self._find_write(repo_id, first_base,
                                                                  write_id)):
                        return applied
                    if parent is not None:
                        raise error from None
                    failure = exc  # no parent asked for: rebuild on the new head
                    continue
                if not _is_transient(exc):
                    raise error from None
                # No blind retry: the commit may have been applied with the reply lost.
                ambiguous, failure = True, exc
                if attempt < self.retries:
                    self._sleep(attempt, exc)
                continue
            sent = _commit_sent(operations)
            if sent is None:  # cannot tell from HfApi's operations: ask the Hub
                sent = self._carries(repo_id, str(info.oid), write_id)
            if sent:  # sent with parent_commit=base and accepted: the commit is ours
                self.traffic.uploaded += _uploaded_bytes(operations, adds)
                self._after_commit(repo_id, base, str(info.oid), adds, delete_specs)
                return str(info.oid)
            if not listed and self.head(repo_id) == base:
                return base  # sent unlisted, and HfApi found every file unchanged: a no-op
            # HfApi sends no commit when, at preupload time, main already holds every
            # change (it then returns main's head, skipping the parent check): someone
            # else moved main. Treat it like a 412.
            if ambiguous and (applied := self._find_write(repo_id, first_base, write_id)):
                return applied
            if parent is not None:
                raise ConflictError(
                    f"commit: {repo_id} moved past {parent[:8]} while we were writing.",
                    hint="Another writer committed first; re-read and retry.")
            failure = ConflictError("main moved")
        if ambiguous and (applied := self._find_write(repo_id, first_base or "", write_id)):
            return applied
        assert failure is not None
        if _is_transient(failure):
            raise self._translate(failure, repo_id, "commit",
                                  attempts=self.retries) or StoreError("commit failed")
        raise ConflictError(f"commit: {repo_id} kept moving under us ({self.retries} tries).",
                            hint="Other writers are very busy on this repo; retry later.")

    def _changes(self, repo_id: str, base: str, payload: Mapping[str, bytes],
                 deletes: Sequence[str]) -> tuple[dict[str, bytes], list[tuple[str, bool]]]:
        """The files that change ``base`` and the deletes (path, is_folder) it needs:
        deletes of absent paths and unchanged files are dropped. With no deletes and no
        cached tree of ``base`` every file is sent without listing it: HfApi's preupload
        leaves out the unchanged ones itself (``commit`` tells a no-op from a race)."""
        tree = self._cached_tree(repo_id, base)
        if tree is None and not any(raw.strip("/") for raw in deletes):
            return dict(payload), []
        tree = tree if tree is not None else self._tree(repo_id, base)
        remaining = set(tree)
        delete_specs: list[tuple[str, bool]] = []
        for raw in deletes:
            path = raw.strip("/")
            if not path:
                continue
            if path in remaining:
                delete_specs.append((path, False))
                remaining.discard(path)
            below = {p for p in remaining if p.startswith(path + "/")}
            if below:
                delete_specs.append((path + "/", True))
                remaining -= below
        adds = {path: data for path, data in payload.items()
                if path not in remaining or not _same_content(tree[path], data)}
        return adds, delete_specs

    def _after_commit(self, repo_id: str, base: str, commit_id: str,
                      adds: Mapping[str, bytes], delete_specs: Sequence[tuple[str, bool]]
                      ) -> None:
        """Cache the tree of a commit we just made (``base``'s, with our changes: the Hub
        applied exactly those on ``base``), so listing it costs nothing."""
        known = self._cached_tree(repo_id, base)
        if known is None:
            return
        tree = dict(known)
        for path, folder in delete_specs:
            for existing in [p for p in tree if (p.startswith(path) if folder else p == path)]:
                del tree[existing]
        for path, data in adds.items():
            tree[path] = {"type": "file", "path": path, "size": len(data),
                          "oid": _git_blob_oid(data),
                          "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}}
        self._remember_tree(repo_id, commit_id, tree)

    @staticmethod
    def _has_write_id(entry: Mapping[str, Any], write_id: str) -> bool:
        text = f"{entry.get('title', '')}\n{entry.get('message', '')}"
        return f"{WRITE_ID_TRAILER}: {write_id}" in text

    def _carries(self, repo_id: str, commit_id: str, write_id: str) -> bool:
        """Whether ``commit_id`` is the commit we wrote (read by id: no index lag).

        When the check itself cannot be made, the answer is yes: the commit POST succeeded,
        and HfApi's skip-the-commit path that this guards against is rare."""
        try:
            entries = self._commits(repo_id, commit_id, max_pages=1)
        except StoreError:
            return True
        return bool(entries) and entries[0].get("id") == commit_id and \
            self._has_write_id(entries[0], write_id)

    def _find_write(self, repo_id: str, since: str, write_id: str) -> str | None:
        """The id of the commit after ``since`` on main that carries ``write_id``, if any."""
        for entry in self._commits(repo_id, max_pages=1):
            if entry.get("id") == since:
                return None
            if self._has_write_id(entry, write_id):
                return str(entry["id"])
        return None


def _build_operations(adds: Mapping[str, bytes], delete_specs: Sequence[tuple[str, bool]]
                      ) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = [CommitOperationDelete(path_in_repo=p, is_folder=folder)
                      for p, folder in delete_specs]
    ops += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in adds.items()]
    return ops


def _commit_sent(operations: Sequence[Any]) -> bool | None:
    """Whether ``create_commit`` sent the commit. HfApi skips it (returning main's head)
    only when every operation is an add whose preupload ``oid`` equals its own; None
    when this huggingface_hub keeps no such attributes."""
    from huggingface_hub import CommitOperationAdd

    if not all(isinstance(op, CommitOperationAdd) for op in operations):
        return True  # a delete is always sent
    try:
        return not all(op._remote_oid is not None and op._remote_oid == op._local_oid
                       for op in operations)
    except AttributeError:
        return None


def _uploaded_bytes(operations: Sequence[Any], adds: Mapping[str, bytes]) -> int:
    """The bytes of the adds HfApi did send (it drops those preupload found unchanged)."""
    unchanged = {op.path_in_repo for op in operations
                 if getattr(op, "_remote_oid", None) is not None
                 and op._remote_oid == getattr(op, "_local_oid", None)}
    return sum(len(data) for path, data in adds.items() if path not in unchanged)


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _same_content(entry: Mapping[str, Any], data: bytes) -> bool:
    """Whether a tree entry (regular or LFS) holds exactly ``data``."""
    lfs = entry.get("lfs")
    if isinstance(lfs, Mapping) and lfs.get("oid"):
        return bool(lfs["oid"] == hashlib.sha256(data).hexdigest())
    return bool(entry.get("oid") == _git_blob_oid(data))


def _iso_date(value: str) -> str:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return value
