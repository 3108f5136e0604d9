"""A round survives our own bugs for one client, and its reasons name no server paths.

* An unexpected (non-FedbipError) exception while reading one client's upload skips that
  client for this round only: the reason says it was an internal error, the upload is
  neither refused nor consumed, the others are published, and the next round retries it.
  KeyboardInterrupt and SystemExit still stop the round.
* Reasons recorded for a client name the fetched folders as ``repo@commit[:12]`` (the
  start adapter as ``repo@start[:12]/personalized``), never the server's cache paths.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from federation_helpers import CLIENTS, new_local_federation, push_fresh
from safetensors.torch import load_file, save_file

import fedbip_hub.rounds as rounds
from fedbip_hub.client import pull, upload_id
from fedbip_hub.federation import Federation
from fedbip_hub.rounds import RoundRunner, run_round
from fedbip_hub.upload_metadata import UPLOAD_METADATA_NAME

FAKE_TOKEN = "hf_RoundRobustnessLeak0123456789"


def _upload_id(fed: Federation, client: str) -> str:
    repo = fed.member(client).repo_id
    return upload_id(fed.store.read_bytes(repo, UPLOAD_METADATA_NAME, fed.store.head(repo)))


def _fail_validation_for(monkeypatch: pytest.MonkeyPatch, client: str,
                         error: BaseException | None = None) -> None:
    """rounds.validate_upload raises for ``client`` only (a bug on our side)."""
    real = rounds.validate_upload

    def validate(folder, config, init, *, label=None, **kwargs):
        if label == client:
            raise error or RuntimeError(
                f"parser bug at {Path(folder) / 'adapter_model.safetensors'}\n"
                f"  (token {FAKE_TOKEN})")
        return real(folder, config, init, label=label, **kwargs)

    monkeypatch.setattr(rounds, "validate_upload", validate)


def _assert_public(reason: str, fed: Federation) -> None:
    """No local path of the server (store cache, temp dirs, HF_HOME) in a reason."""
    for local in {str(fed.store.cache_dir), str(Path(fed.store.cache_dir).resolve()),
                  os.environ["HF_HOME"], "/tmp"}:
        assert local not in reason, (local, reason)


def _assert_internal_reason(reason: str, repo: str, commit: str) -> None:
    assert "internal error" in reason and "RuntimeError: parser bug" in reason, reason
    assert "NOT refused" in reason and "retried next round" in reason, reason
    assert "report" in reason, reason
    assert f"{repo}@{commit[:12]}/adapter_model.safetensors" in reason, reason
    assert FAKE_TOKEN not in reason and "hf_RoundRobustness" not in reason, reason
    assert "\n" not in reason, reason


def test_an_internal_error_skips_one_client_for_one_round_and_it_is_retried(
        tmp_path, tiny_base, monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    repo = fed.member("bob").repo_id
    bob_upload, bob_commit = _upload_id(fed, "bob"), fed.store.head(repo)
    _fail_validation_for(monkeypatch, "bob")
    lines: list[str] = []

    first = RoundRunner(fed, log=lines.append).run()
    assert first["status"] == "completed" and first["round"] == 1
    assert sorted(first["outputs"]) == ["alice", "carol"]
    assert sorted(first["clients"]) == ["alice", "carol"]
    assert sorted(first["skipped"]) == ["bob"]
    _assert_internal_reason(first["skipped"]["bob"], repo, bob_commit)
    _assert_public(first["skipped"]["bob"], fed)
    internal = [line for line in lines if "Internal error" in line]
    assert len(internal) == 1 and "bob" in internal[0], lines
    assert FAKE_TOKEN not in "\n".join(lines)
    state = fed.state()
    assert state.round == 1 and state.in_progress is None
    bob = state.client("bob")
    assert bob.refused_upload is None and bob.consumed_upload is None
    assert bob.personalized_history == []
    for client in ("alice", "carol"):
        assert len(state.client(client).personalized_history) == 1

    monkeypatch.undo()
    second = run_round(fed)
    assert second["status"] == "completed" and second["round"] == 2
    assert second["inputs"]["bob"]["fresh"] is True
    assert second["inputs"]["bob"]["upload_id"] == bob_upload
    assert {c: v["fresh"] for c, v in second["inputs"].items()} == {
        "alice": False, "bob": True, "carol": False}
    assert "bob" in second["outputs"] and not second["skipped"]
    bob = fed.state().client("bob")
    assert bob.consumed_upload == bob_upload and bob.refused_upload is None
    assert run_round(fed)["status"] == "nothing-new"


def test_an_internal_error_on_the_only_fresh_upload_completes_an_empty_round(
        tmp_path, tiny_base, monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    push_fresh(fed, tmp_path, "carol", seed=20, group=1)
    carol_upload = _upload_id(fed, "carol")
    _fail_validation_for(monkeypatch, "carol")

    second = run_round(fed)  # like a round whose only fresh upload is refused
    assert second["status"] == "completed" and second["round"] == 2
    assert second["outputs"] == {} and second["weights"] is None
    assert "internal error" in second["skipped"]["carol"]
    carol = fed.state().client("carol")
    assert carol.refused_upload is None and carol.consumed_upload != carol_upload
    assert fed.state().in_progress is None

    monkeypatch.undo()
    third = run_round(fed)
    assert third["round"] == 3 and third["inputs"]["carol"]["fresh"] is True
    assert sorted(third["outputs"]) == sorted(CLIENTS)
    assert fed.state().client("carol").consumed_upload == carol_upload


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_still_stop_the_round(
        interrupt, workers, tmp_path, tiny_base, monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    _fail_validation_for(monkeypatch, "bob", interrupt())
    runner = RoundRunner(fed)
    runner.download_workers = workers
    with pytest.raises(interrupt):
        runner.run()
    state = fed.state()
    assert state.round == 0 and state.in_progress is not None  # the lease stays, as on a kill
    assert all(c.refused_upload is None and c.consumed_upload is None
               for c in state.clients.values())


def _commit_bad_weights(fed: Federation, client: str, tmp_path: Path, *,
                        truncated: bool) -> str:
    """Commit a NaN-poisoned or truncated adapter_model.safetensors past the client gate."""
    repo = fed.member(client).repo_id
    head = fed.store.head(repo)
    folder = fed.store.fetch_folder(repo, head)
    if truncated:
        weights: Path | bytes = (folder / "adapter_model.safetensors").read_bytes()[:5]
    else:
        tensors = load_file(folder / "adapter_model.safetensors")
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")
        weights = tmp_path / f"poisoned-{client}.safetensors"
        save_file(tensors, weights, metadata={"format": "pt"})
    metadata = json.loads((folder / UPLOAD_METADATA_NAME).read_text())
    metadata["upload_nonce"] = f"bad-{client}"
    return fed.store.commit(repo, {"adapter_model.safetensors": weights,
                                   UPLOAD_METADATA_NAME: json.dumps(metadata).encode()},
                            message="bypass the client-side gate", parent=head)


def test_refusal_reasons_name_the_upload_not_the_server_cache(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    commits = {"bob": _commit_bad_weights(fed, "bob", tmp_path, truncated=False),
               "carol": _commit_bad_weights(fed, "carol", tmp_path, truncated=True)}
    record = run_round(fed)
    assert sorted(record["outputs"]) == ["alice"]
    for client, phrase in (("bob", "NaN"), ("carol", "is truncated")):
        reason = record["skipped"][client]
        repo = fed.member(client).repo_id
        assert phrase in reason, reason
        assert re.search(re.escape(repo) + r"@[0-9a-f]{12}/adapter_model\.safetensors",
                         reason), reason
        assert f"{repo}@{commits[client][:12]}/adapter_model.safetensors" in reason, reason
        _assert_public(reason, fed)
        assert fed.state().client(client).refused_upload == _upload_id(fed, client)


def test_reasons_name_the_start_adapter_and_the_init_publicly(tmp_path, tiny_base,
                                                              monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    start = pull(fed, "alice", tmp_path / "alice-start")
    commit = push_fresh(fed, tmp_path, "alice", seed=30, group=0, start=start.folder)
    push_fresh(fed, tmp_path, "bob", seed=31, group=0)  # from the init
    real = rounds.TaskVector

    def task_vector(upload, start_adapter, *, name):
        if name in ("alice", "bob"):
            raise RuntimeError(f"cannot diff {upload.weights_path} against "
                               f"{start_adapter.weights_path}")
        return real(upload, start_adapter, name=name)

    monkeypatch.setattr(rounds, "TaskVector", task_vector)
    record = run_round(fed)
    alice, bob = record["skipped"]["alice"], record["skipped"]["bob"]
    repo = fed.member("alice").repo_id
    assert (f"cannot diff {repo}@{commit[:12]}/adapter_model.safetensors against "
            f"{repo}@{start.revision[:12]}/personalized/adapter_model.safetensors") in alice
    bob_repo = fed.member("bob").repo_id
    init = f"{fed.repo_id}@{record['federation_revision'][:12]}/init/adapter_model.safetensors"
    assert f"{bob_repo}@{fed.store.head(bob_repo)[:12]}/adapter_model.safetensors" in bob
    assert f"against {init}" in bob, bob
    for reason in (alice, bob):
        assert "internal error" in reason
        _assert_public(reason, fed)


def test_refusal_reasons_on_the_hub_name_no_hub_cache_path(hub, tmp_path, tiny_base):
    from test_rounds import _federation_on_hub

    fed = _federation_on_hub(tiny_base)
    commit = _commit_bad_weights(fed, "bob", tmp_path, truncated=False)
    record = run_round(fed)
    assert sorted(record["outputs"]) == ["alice", "carol"]
    reason = record["skipped"]["bob"]
    repo = fed.member("bob").repo_id
    assert "NaN" in reason and f"{repo}@{commit[:12]}/adapter_model.safetensors" in reason
    _assert_public(reason, fed)


def test_a_hub_failure_while_downloading_skips_without_refusing(tmp_path, tiny_base,
                                                                 monkeypatch):
    """Retries exhausted (a StoreError) say nothing about the upload: it is retried."""
    from fedbip_hub.errors import StoreError

    fed = new_local_federation(tmp_path, tiny_base)
    _fail_validation_for(monkeypatch, "bob",
                         StoreError("the Hub kept answering 503", hint="Retry later."))
    first = run_round(fed)
    assert sorted(first["outputs"]) == ["alice", "carol"]
    assert "503" in first["skipped"]["bob"] and "NOT refused" in first["skipped"]["bob"]
    assert fed.state().client("bob").refused_upload is None
    monkeypatch.undo()
    second = run_round(fed)
    assert second["inputs"]["bob"]["fresh"] and "bob" in second["outputs"]
