"""A round survives our own bugs for one client, and its reasons name no server paths.

* An unexpected (non-FedbipError) exception while reading one client's upload skips that
  client: the reason says it was an internal error, the upload is neither refused nor
  consumed, and the others are published. The next round that has other news retries it
  (as does another fedbip version); by itself it is no news, so a bug that hits one
  upload records one round, not an empty round every run. KeyboardInterrupt and
  SystemExit still stop the round.
* Reasons recorded for a client name the fetched folders as ``repo@commit[:12]`` (the
  start adapter as ``repo@start[:12]/personalized``), never the server's cache paths.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    Crash,
    crash_at,
    new_local_federation,
    publish_commits,
    published_outputs,
    published_tensors,
    pull_and_push,
    push_fresh,
    reached,
)
from safetensors.torch import load_file, save_file

import fedbip_hub
import fedbip_hub.server.vectors as vectors
from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.federation.client import pull, upload_id
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner, run_round

FAKE_TOKEN = "hf_RoundRobustnessLeak0123456789"


def _upload_id(fed: Federation, client: str) -> str:
    repo = fed.member(client).repo_id
    return upload_id(fed.store.read_bytes(repo, UPLOAD_METADATA_NAME, fed.store.head(repo)))


def _fail_validation_for(monkeypatch: pytest.MonkeyPatch, client: str,
                         error: BaseException | None = None) -> None:
    """vectors.validate_upload raises for ``client`` only (a bug on our side)."""
    real = vectors.validate_upload

    def validate(folder, config, init, *, label=None, **kwargs):
        if label == client:
            raise error or RuntimeError(
                f"parser bug at {Path(folder) / 'adapter_model.safetensors'}\n"
                f"  (token {FAKE_TOKEN})")
        return real(folder, config, init, label=label, **kwargs)

    monkeypatch.setattr(vectors, "validate_upload", validate)


def _assert_public(reason: str, fed: Federation) -> None:
    """No local path of the server (store cache, temp dirs, HF_HOME) in a reason."""
    for local in {str(fed.store.cache_dir), str(Path(fed.store.cache_dir).resolve()),
                  os.environ["HF_HOME"], "/tmp"}:
        assert local not in reason, (local, reason)


def _assert_internal_reason(reason: str, repo: str, commit: str) -> None:
    assert "internal error" in reason and "RuntimeError: parser bug" in reason, reason
    assert "NOT refused" in reason and "retried with the next round that has other news" \
        in reason, reason
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
    assert reached(first) == ["alice", "carol"]
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
    head = fed.head()
    waiting = run_round(fed)  # bob's upload alone is no news: no empty round, no commit
    assert waiting["status"] == "nothing-new" and fed.head() == head
    assert "internal error on the server in round 1" in waiting["skipped"]["bob"]
    pull_and_push(fed, tmp_path, "alice", seed=40, group=0)
    second = run_round(fed)  # alice's news: bob's upload is retried with it
    assert second["status"] == "completed" and second["round"] == 2
    assert second["inputs"]["bob"]["fresh"] is True
    assert second["inputs"]["bob"]["upload_id"] == bob_upload
    assert {c: v["fresh"] for c, v in second["inputs"].items()} == {
        "alice": True, "bob": True, "carol": False}
    assert "bob" in second["outputs"] and not second["skipped"]
    bob = fed.state().client("bob")
    assert bob.consumed_upload == bob_upload and bob.refused_upload is None
    assert bob.internal_error_upload is None
    assert run_round(fed)["status"] == "nothing-new"


def test_an_internal_error_on_the_only_fresh_upload_records_one_round_not_one_per_run(
        tmp_path, tiny_base, monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    push_fresh(fed, tmp_path, "carol", seed=20, group=1)
    carol_upload = _upload_id(fed, "carol")
    _fail_validation_for(monkeypatch, "carol")

    second = run_round(fed)  # recorded once, like a round whose only fresh upload is refused
    assert second["status"] == "completed" and second["round"] == 2
    assert second["outputs"] == {} and second["weights"] is None
    assert "internal error" in second["skipped"]["carol"]
    carol = fed.state().client("carol")
    assert carol.refused_upload is None and carol.consumed_upload != carol_upload
    assert carol.internal_error_upload == carol_upload and carol.internal_error_round == 2
    assert fed.state().in_progress is None

    head = fed.head()
    for _ in range(3):  # every later run: no lease, no empty round, no commit at all
        again = run_round(fed)
        assert again["status"] == "nothing-new" and again["round"] == 2
        assert "internal error on the server in round 2" in again["skipped"]["carol"]
    assert fed.head() == head

    monkeypatch.undo()  # the fix ships as a new version: that version retries it alone
    monkeypatch.setattr(fedbip_hub, "__version__", f"{fedbip_hub.__version__}.post1")
    third = run_round(fed)
    assert third["round"] == 3 and third["inputs"]["carol"]["fresh"] is True
    assert reached(third) == sorted(CLIENTS)
    carol = fed.state().client("carol")
    assert carol.consumed_upload == carol_upload and carol.internal_error_upload is None


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
    assert reached(record) == ["alice"]
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
    real = vectors.TaskVector

    def task_vector(upload, start_adapter, *, name):
        if name in ("alice", "bob"):
            raise RuntimeError(f"cannot diff {upload.weights_path} against "
                               f"{start_adapter.weights_path}")
        return real(upload, start_adapter, name=name)

    monkeypatch.setattr(vectors, "TaskVector", task_vector)
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
    assert reached(record) == ["alice", "carol"]
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
    assert reached(first) == ["alice", "carol"]
    assert "503" in first["skipped"]["bob"] and "NOT refused" in first["skipped"]["bob"]
    assert fed.state().client("bob").refused_upload is None
    monkeypatch.undo()
    second = run_round(fed)
    assert second["inputs"]["bob"]["fresh"] and "bob" in second["outputs"]


# -- a member repo that refuses the publish commit --------------------------------------
# One client's personalized adapter cannot be published (401/403: the server's token lost
# write access; 404: the member deleted its repo after the round was planned; retries
# exhausted). The others are published, the round completes, the client's upload is
# consumed (it reached the others: never applied twice) and its history does not advance.


@pytest.fixture(scope="module")
def clean_outputs(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    """new_local_federation's first round, undisturbed: every client's published tensors."""
    fed = new_local_federation(tmp_path_factory.mktemp("clean-publish"), tiny_base)
    run_round(fed)
    return published_outputs(fed)


def _refuse_commits_to(monkeypatch: pytest.MonkeyPatch, fed: Federation, client: str,
                       error: BaseException | None = None) -> list[str]:
    """The federation's store refuses commits to ``client``'s repo (the token lost write
    access); returns the repos it refused, one entry per attempt."""
    from fedbip_hub.errors import AuthError

    real = fed.store.commit
    repo = fed.member(client).repo_id
    refused: list[str] = []

    def commit(repo_id, files, **kwargs):
        if repo_id == repo:
            refused.append(repo_id)
            raise error or AuthError(
                f"commit: the token has no rights for this on {repo_id} (403).",
                hint=f"Give the token write access to this repo (token {FAKE_TOKEN}).")
        return real(repo_id, files, **kwargs)

    monkeypatch.setattr(fed.store, "commit", commit)
    return refused


def _assert_publish_failed(record: dict, fed: Federation, client: str, *, phrase: str,
                           fix: str, clean: dict) -> None:
    """The round completed; ``client`` alone is unpublished, recorded with an actionable
    reason; the others got exactly the clean round's adapters (its upload was used)."""
    repo = fed.member(client).repo_id
    others = sorted(set(CLIENTS) - {client})
    assert record["status"] == "completed" and record["round"] == 1
    assert reached(record) == others
    assert sorted(record["clients"]) == sorted(CLIENTS)
    assert record["inputs"][client]["fresh"] is True
    assert sorted(record["publish_failed"]) == [client]
    assert phrase in record["publish_failed"][client], record["publish_failed"]
    reason = record["skipped"][client]
    assert sorted(record["skipped"]) == [client]
    assert f"could not be published to {repo}" in reason, reason
    assert phrase in reason and fix in reason, reason
    assert "WAS used for the other clients" in reason, reason
    for text in (reason, record["publish_failed"][client]):
        assert FAKE_TOKEN not in text and "\n" not in text, text
        _assert_public(text, fed)
    for other in others:  # bob's update reached them exactly as in an undisturbed round
        tensors = published_tensors(fed, other)
        assert tensors.keys() == clean[other].keys()
        for key, value in clean[other].items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
        assert publish_commits(fed, other) == 1
    assert publish_commits(fed, client) == 0
    state = fed.state()
    assert state.round == 1 and state.in_progress is None  # no lease left behind
    failed = state.client(client)
    assert failed.consumed_upload == _upload_id(fed, client)  # consumed: never twice
    assert failed.refused_upload is None
    assert failed.personalized_history == [] and failed.last_round is None
    for other in others:
        assert len(state.client(other).personalized_history) == 1
    stored = json.loads(fed.store.read_bytes(fed.repo_id, "rounds/000001.json", fed.head()))
    assert stored["publish_failed"] == record["publish_failed"]
    assert stored["skipped"][client] == reason
    titles = [c.title for c in fed.store.history(fed.repo_id)]
    assert titles.count("fedbip: round 1 completed") == 1


def test_a_publish_refused_for_one_client_does_not_stop_the_round(
        tmp_path, tiny_base, monkeypatch, clean_outputs):
    fed = new_local_federation(tmp_path, tiny_base)
    refused = _refuse_commits_to(monkeypatch, fed, "bob")
    lines: list[str] = []

    record = RoundRunner(fed, log=lines.append).run()
    assert refused == [fed.member("bob").repo_id]
    _assert_publish_failed(record, fed, "bob", phrase="(403)",
                           fix="grant the server's token write access to", clean=clean_outputs)
    failures = [line for line in lines if "Could not publish" in line]
    assert len(failures) == 1 and "bob" in failures[0], lines
    assert FAKE_TOKEN not in "\n".join(lines)
    # the federation's dashboard lists the failure too
    readme = fed.store.read_bytes(fed.repo_id, "README.md", fed.head()).decode()
    assert "could not be published" in readme

    again = run_round(fed)  # bob's upload was consumed: not applied a second time
    assert again["status"] == "nothing-new"
    assert fed.state().round == 1

    # Access restored and a new upload from bob: the next round publishes bob's adapter,
    # built on its previous one (the init: nothing was ever published for it).
    monkeypatch.undo()
    push_fresh(fed, tmp_path, "bob", seed=40, group=0)
    second = run_round(fed)
    assert second["status"] == "completed" and second["round"] == 2
    assert reached(second) == sorted(CLIENTS) and not second["skipped"]
    assert second["publish_failed"] == {}
    assert {c: v["fresh"] for c, v in second["inputs"].items()} == {
        "alice": False, "bob": True, "carol": False}
    bob_repo = fed.member("bob").repo_id
    merge = json.loads(fed.store.read_bytes(bob_repo, "personalized/fedbip_merge.json",
                                            fed.store.head(bob_repo)))
    assert merge["round"] == 2 and merge["previous_revision"] is None
    state = fed.state()
    assert len(state.client("bob").personalized_history) == 1
    assert state.client("bob").last_round == 2
    assert publish_commits(fed, "bob") == 1


@pytest.mark.parametrize("error", ["not-found", "retries-exhausted"])
def test_other_store_errors_on_publish_are_recorded_too(error, tmp_path, tiny_base,
                                                        monkeypatch, clean_outputs):
    from fedbip_hub.errors import NotFoundError, StoreError

    fed = new_local_federation(tmp_path, tiny_base)
    repo = fed.member("carol").repo_id
    exc, phrase, fix = {
        "not-found": (NotFoundError(f"repo {repo} does not exist.", hint="Join first."),
                      f"repo {repo} does not exist", "recreate it (`fedbip join`)"),
        "retries-exhausted": (StoreError(f"commit on {repo} failed after 5 attempts: HTTP "
                                         "503", hint="Retry later."),
                              "after 5 attempts", "retry later"),
    }[error]
    _refuse_commits_to(monkeypatch, fed, "carol", exc)
    record = run_round(fed)
    _assert_publish_failed(record, fed, "carol", phrase=phrase, fix=fix, clean=clean_outputs)
    assert run_round(fed)["status"] == "nothing-new"


def test_a_bug_while_publishing_still_stops_the_round(tmp_path, tiny_base, monkeypatch):
    """Only store errors are one client's problem; anything else keeps the lease, so the
    round is resumed (not completed with a silently missing adapter)."""
    fed = new_local_federation(tmp_path, tiny_base)
    _refuse_commits_to(monkeypatch, fed, "bob", RuntimeError("bug in the publisher"))
    with pytest.raises(RuntimeError, match="bug in the publisher"):
        run_round(fed)
    state = fed.state()
    assert state.round == 0 and state.in_progress is not None
    assert all(c.consumed_upload is None for c in state.clients.values())


def test_a_failed_publish_is_retried_when_the_round_is_resumed(tmp_path, tiny_base,
                                                               monkeypatch, clean_outputs):
    """A crash after bob's publish failed: the resumed round publishes bob (it was never
    "already published"), does not republish the others, and completes once."""
    fed = new_local_federation(tmp_path, tiny_base)
    _refuse_commits_to(monkeypatch, fed, "bob")
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at("before-record")).run()
    assert fed.state().in_progress is not None
    assert publish_commits(fed, "bob") == 0
    assert publish_commits(fed, "alice") == publish_commits(fed, "carol") == 1

    monkeypatch.undo()  # the operator fixed the token's access, then took the round over
    record = run_round(fed, takeover=True)
    assert record["status"] == "completed" and record["round"] == 1
    assert reached(record) == sorted(CLIENTS)
    assert record["publish_failed"] == {} and record["skipped"] == {}
    assert record["outputs"]["alice"]["resumed"] and record["outputs"]["carol"]["resumed"]
    assert not record["outputs"]["bob"].get("resumed")
    for client in CLIENTS:
        assert publish_commits(fed, client) == 1
        tensors = published_tensors(fed, client)
        for key, value in clean_outputs[client].items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    state = fed.state()
    assert state.round == 1 and state.in_progress is None
    assert all(len(state.client(c).personalized_history) == 1 for c in CLIENTS)
    assert run_round(fed)["status"] == "nothing-new"  # a completed round is never re-run
    assert run_round(fed, takeover=True)["status"] == "nothing-new"


@pytest.mark.parametrize("failure", ["403", "deleted"])
def test_a_member_repo_refusing_the_publish_over_http_does_not_stop_the_round(
        failure, hub, tmp_path, tiny_base, clean_outputs):
    """Over HTTP against the local Hub: the server's commits to bob's repo answer 403, or
    bob deletes its repo after the round was planned (404)."""
    from federation_helpers import new_hub_federation
    from huggingface_hub import HfApi
    from test_round_faults import _server

    repo_id = f"fedorg/pubfail-{failure}"
    bob_repo = f"{repo_id}-bob"
    new_hub_federation(repo_id, tiny_base, tmp_path)
    fed = _server(repo_id, tmp_path)
    assert fed.member("bob").repo_id == bob_repo
    bob_upload = _upload_id(fed, "bob")
    fault = None
    if failure == "403":
        fault = hub.inject_fault("POST", rf"/api/models/{bob_repo}/(preupload|commit)/",
                                 status=403, times=None)

    def checkpoint(step: str) -> None:
        if failure == "deleted" and step == "computed":
            HfApi().delete_repo(bob_repo)

    record = RoundRunner(fed, checkpoint=checkpoint).run()
    assert record["status"] == "completed" and record["round"] == 1
    assert reached(record) == ["alice", "carol"]
    assert sorted(record["publish_failed"]) == ["bob"]
    reason = record["skipped"]["bob"]
    assert sorted(record["skipped"]) == ["bob"]
    assert f"could not be published to {bob_repo}" in reason, reason
    assert "WAS used for the other clients" in reason, reason
    if failure == "403":
        assert fault is not None and fault.hits >= 1
        assert f"no rights for this on {bob_repo} (403)" in reason, reason
        assert f"grant the server's token write access to {bob_repo}" in reason, reason
        assert hub.head(bob_repo) == fed.store.head(bob_repo)
        assert publish_commits(fed, "bob") == 0
    else:
        assert not hub.repo_exists(bob_repo)
        assert f"repo {bob_repo} not found" in reason, reason
        assert "recreate it (`fedbip join`)" in reason, reason
    assert "hf_" not in reason
    _assert_public(reason, fed)
    for client in ("alice", "carol"):
        tensors = published_tensors(fed, client)
        for key, value in clean_outputs[client].items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
        assert publish_commits(fed, client) == 1
    state = fed.state()
    assert state.round == 1 and state.in_progress is None
    bob = state.client("bob")
    assert bob.consumed_upload == bob_upload and bob.personalized_history == []
    again = run_round(fed)
    assert again["status"] == "nothing-new" and fed.state().round == 1


def test_fedbip_debug_logs_the_internal_errors_traceback_redacted(tmp_path, tiny_base,
                                                                  monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    _fail_validation_for(monkeypatch, "bob")
    lines: list[str] = []
    RoundRunner(fed, log=lines.append).run()
    assert not any("Traceback" in line for line in lines)  # only with FEDBIP_DEBUG
    push_fresh(fed, tmp_path, "bob", seed=41, group=CLIENTS["bob"])
    monkeypatch.setenv("FEDBIP_DEBUG", "1")
    RoundRunner(fed, log=lines.append).run()
    tracebacks = [line for line in lines if line.startswith("Traceback")]
    assert len(tracebacks) == 1 and "RuntimeError: parser bug" in tracebacks[0]
    assert "in validate" in tracebacks[0] and FAKE_TOKEN not in "\n".join(lines)
