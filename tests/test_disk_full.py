"""The server's disk filling up (ENOSPC) is one clear error, never a traceback, never a
client skipped or refused for it; the round's lease stays, and once there is room
``--takeover`` resumes it to exactly the uninterrupted result.

The failure is injected where the bytes are written: the local store's file writes
(commits to member repos and to the federation repo), its download into the cache, and
the streaming merge's staging files.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from federation_helpers import CLIENTS, new_local_federation, publish_commits
from federation_helpers import published_outputs as _outputs
from typer.testing import CliRunner

import fedbip_hub.server.streaming as streaming
import fedbip_hub.stores.local as local_store
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import run_round
from server_job.main import app


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("clean"), tiny_base)
    run_round(fed)
    return _outputs(fed)


def _disk_full(path: object = "") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _fail_writes_under(monkeypatch: pytest.MonkeyPatch, fragment: str) -> None:
    """The local store's atomic file writes fail with ENOSPC for paths containing it."""
    real = local_store._atomic_write

    def write(path: Path, data: bytes) -> None:
        if fragment in str(path):
            raise _disk_full(path)
        real(path, data)

    monkeypatch.setattr(local_store, "_atomic_write", write)


def _fail_download_of(monkeypatch: pytest.MonkeyPatch, repo: str) -> None:
    real = local_store.LocalStore._download

    def download(self, repo_id, path, revision, dest):
        if repo_id == repo:
            raise _disk_full(dest)
        real(self, repo_id, path, revision, dest)

    monkeypatch.setattr(local_store.LocalStore, "_download", download)


def _fail_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    def save_file(tensors, path, *args, **kwargs):
        raise _disk_full(path)

    monkeypatch.setattr(streaming, "save_file", save_file)


INJECTIONS = {
    "publishing bob": lambda mp, fed: _fail_writes_under(mp, "clients/bob/objects"),
    "recording the round": lambda mp, fed: _fail_writes_under(mp, "repos/federation/commits"),
    "downloading bob": lambda mp, fed: _fail_download_of(mp, fed.member("bob").repo_id),
    "staging the merge": lambda mp, fed: _fail_staging(mp),
}


@pytest.mark.parametrize("where", INJECTIONS)
def test_a_full_disk_is_one_clear_error_and_the_round_resumes(where, tmp_path, tiny_base,
                                                              uninterrupted, monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    # the lease is committed first; the disk fills up after it
    leased = {"done": False}
    real_commit = fed.store.commit

    def commit(repo_id, files, **kwargs):
        result = real_commit(repo_id, files, **kwargs)
        if kwargs.get("message", "").endswith("started") and not leased["done"]:
            leased["done"] = True
            INJECTIONS[where](monkeypatch, fed)
        return result

    monkeypatch.setattr(local_store.LocalStore, "commit",
                        lambda self, repo_id, files, **kw: commit(repo_id, files, **kw))
    result = CliRunner().invoke(app, ["run", fed.address])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    text = " ".join(result.stderr.split())
    assert "ENOSPC (No space left on device)" in text, text
    assert "--takeover" in text and "Free space" in text, text

    monkeypatch.undo()  # room again
    state = Federation.at(fed.address).state()
    assert state.round == 0 and state.in_progress is not None  # the lease stayed
    assert all(c.refused_upload is None and c.consumed_upload is None
               for c in state.clients.values())  # nobody was blamed for our disk
    assert not list(Path(fed.store.root).rglob("*.tmp"))  # no partial files left
    record = run_round(fed, takeover=True)
    assert record["status"] == "completed" and not record["skipped"], record
    for client, tensors in _outputs(fed).items():
        for key, value in uninterrupted[client].items():
            assert torch.equal(tensors[key], value), (client, key)
    assert all(publish_commits(fed, c) == 1 for c in CLIENTS)
