"""The LFS side of uploads. This server stores every file as a regular git blob: new repos
get the LFS rules the real Hub writes into `.gitattributes`, preupload answers every file
"regular" (so huggingface_hub starts no LFS or Xet transfer), and a commit's `lfsFile`
operation is refused (in `Commits._apply_operations`).
"""

from __future__ import annotations

import threading
from typing import Any

from fedbip_hub.testing.hub_server.state import git_blob_oid
from fedbip_hub.testing.hub_server.transport import _json_response, _Request, _Response

# The LFS rules the real Hub writes into a new repo (for the file types fedbip uploads).
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


class Preupload:
    """`HubServer`'s preupload route: the upload mode and remote oid of each file."""

    _lock: threading.RLock

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        body = request.json()
        with self._lock:
            commit = (
                self._resolve_or_404(repo, rev)
                if request.flag("create_pr")
                else repo.commits[repo.branches[self._branch_or_404(repo, rev)]]
            )
        files = []
        for item in body.get("files", []):
            entry: dict[str, Any] = {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
            }
            if item["path"] in commit.files:
                entry["oid"] = git_blob_oid(commit.files[item["path"]])
            files.append(entry)
        return _json_response({"files": files, "commitOid": commit.oid})
