"""A member that deletes and recreates its repo starts over instead of stalling everyone.

Its last personalized revision (state.json's personalized_history) no longer exists in the
recreated repo. The round notices it per client while planning (a definite not-found of
that revision while the repo itself answers), merges its new upload onto the federation's
initial adapter with staleness 0, records why in the round record (``restarted``) and
resets its history in state. A transient Hub failure on that check is not taken for
"gone": the client is skipped for the round and its history kept. A plan pinned before
the repo was recreated (or by an older fedbip) skips that client when its latest adapter
cannot be read, and the others are published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    Crash,
    crash_at,
    new_local_federation,
    published_tensors,
    push_fresh,
    reached,
)

from fedbip_hub.federation.client import join, latest_personalized_revision, pull
from fedbip_hub.federation.config import MERGE_RECORD, PERSONALIZED_DIR, STATE_FILE, dump_json
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner, run_round

GONE = "is gone (repo recreated?)"
FROM_INIT = "starting again from the federation's initial adapter"


def _merge_record(fed: Federation, client: str) -> tuple[str, dict]:
    repo = fed.member(client).repo_id
    revision = latest_personalized_revision(fed, repo)
    assert revision is not None, f"{client} has no personalized adapter"
    return revision, json.loads(fed.store.read_bytes(
        repo, f"{PERSONALIZED_DIR}/{MERGE_RECORD}", revision))


def _edit_state(fed: Federation, edit) -> None:
    head = fed.head()
    state = fed.state(head)
    edit(state)
    fed.store.commit(fed.repo_id, {STATE_FILE: dump_json(state)}, message="test: edit state",
                     parent=head)


def _recreate_local(fed: Federation, root: Path, client: str) -> None:
    """The member deletes its repo (a folder of the local store) and joins again."""
    repo = fed.member(client).repo_id
    shutil.rmtree(root / "fed" / "repos" / repo)
    assert not fed.store.repo_exists(repo)
    join(fed, client)
    assert fed.store.repo_exists(repo)
    assert latest_personalized_revision(fed, repo) is None


def _assert_restarted(record: dict, repo: str, client: str = "bob") -> None:
    assert sorted(record["restarted"]) == [client], record["restarted"]
    note = record["restarted"][client]
    assert f"personalized history of {repo} {GONE}" in note, note
    assert FROM_INIT in note, note


# -- local-folder store ---------------------------------------------------------------
def test_a_recreated_member_repo_starts_over_from_the_init(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    first = run_round(fed)
    assert first["status"] == "completed" and first["restarted"] == {}
    bob_repo = fed.member("bob").repo_id
    old = fed.state().client("bob")
    assert len(old.personalized_history) == 1
    alice_r1 = fed.state().client("alice").personalized_history[-1]

    _recreate_local(fed, tmp_path, "bob")
    bob_push = push_fresh(fed, tmp_path, "bob", seed=11, group=0)  # from the init
    alice = pull(fed, "alice", tmp_path / "alice-r1")
    push_fresh(fed, tmp_path, "alice", seed=12, group=0, start=alice.folder)

    # The reference: the same federation where bob simply has no history (a new member).
    shutil.copytree(tmp_path / "fed", tmp_path / "control" / "fed")
    control = Federation.at(str(tmp_path / "control" / "fed"))

    def forget_bob(state) -> None:
        bob = state.client("bob")
        bob.personalized_history, bob.consumed_commit, bob.consumed_start = [], None, None

    _edit_state(control, forget_bob)
    expected_record = run_round(control)
    assert expected_record["restarted"] == {}

    lines: list[str] = []
    second = RoundRunner(fed, log=lines.append).run()
    assert second["status"] == "completed" and second["round"] == 2
    assert reached(second) == sorted(CLIENTS)
    assert second["skipped"] == {} and second["publish_failed"] == {}
    _assert_restarted(second, bob_repo)
    assert any(GONE in line for line in lines), lines
    bob_input = second["inputs"]["bob"]
    assert bob_input["commit"] == bob_push and bob_input["fresh"]
    assert bob_input["start_revision"] is None and bob_input["staleness"] == 0
    assert second["inputs"]["alice"]["staleness"] == 0  # the others: as usual
    assert second["inputs"]["alice"]["start_revision"] == alice_r1
    assert not second["inputs"]["carol"]["fresh"]
    assert second["weights"] == expected_record["weights"]

    # bob's adapter is the init plus bob's merge: exactly what a member with no history gets.
    for client in CLIENTS:
        tensors, reference = published_tensors(fed, client), published_tensors(control, client)
        assert tensors.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    bob_r2, bob_merge = _merge_record(fed, "bob")
    assert bob_merge["previous_revision"] is None and bob_merge["round"] == 2
    assert _merge_record(fed, "alice")[1]["previous_revision"] == alice_r1

    state = fed.state()
    assert state.round == 2 and state.in_progress is None
    assert state.client("bob").personalized_history == [bob_r2]
    assert state.client("bob").consumed_commit == bob_push
    assert state.client("bob").consumed_start is None
    assert len(state.client("alice").personalized_history) == 2
    # carol: republished only when a fresh update reaches it (else unchanged, see reached)
    assert len(state.client("carol").personalized_history) == 1 + ("carol" in second["outputs"])
    stored = json.loads(fed.store.read_bytes(fed.repo_id, "rounds/000002.json", fed.head()))
    assert stored["restarted"] == second["restarted"]

    # Round 3: bob trains from its new personalized adapter; nothing special any more.
    bob = pull(fed, "bob", tmp_path / "bob-r2")
    assert bob.revision == bob_r2
    push_fresh(fed, tmp_path, "bob", seed=13, group=0, start=bob.folder)
    third = run_round(fed)
    assert third["status"] == "completed" and third["round"] == 3
    assert third["restarted"] == {} and third["skipped"] == {}
    assert reached(third) == sorted(CLIENTS)
    assert third["inputs"]["bob"]["start_revision"] == bob_r2
    assert third["inputs"]["bob"]["staleness"] == 0
    assert _merge_record(fed, "bob")[1]["previous_revision"] == bob_r2
    assert len(fed.state().client("bob").personalized_history) == 2
    assert run_round(fed)["status"] == "nothing-new"


def test_a_recreated_repo_without_a_new_upload_is_skipped_and_reset(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    bob_repo = fed.member("bob").repo_id
    _recreate_local(fed, tmp_path, "bob")
    push_fresh(fed, tmp_path, "alice", seed=21, group=0)

    second = run_round(fed)
    assert second["status"] == "completed"
    assert reached(second) == ["alice", "carol"]
    _assert_restarted(second, bob_repo)
    reason = second["skipped"]["bob"]
    assert GONE in reason and "no new upload yet" in reason, reason
    bob = fed.state().client("bob")
    assert bob.personalized_history == [] and bob.consumed_commit is None

    # Its state is consistent now: no further "gone", just "has not pushed".
    push_fresh(fed, tmp_path, "carol", seed=22, group=1)
    third = run_round(fed)
    assert third["restarted"] == {}
    assert "has not pushed an adapter yet" in third["skipped"]["bob"]

    push_fresh(fed, tmp_path, "bob", seed=23, group=0)
    fourth = run_round(fed)
    assert fourth["restarted"] == {} and "bob" in fourth["outputs"]
    assert fourth["inputs"]["bob"]["staleness"] == 0
    assert _merge_record(fed, "bob")[1]["previous_revision"] is None


def test_a_plan_pinned_before_the_repo_was_recreated_skips_that_client_only(
        tmp_path, tiny_base):
    """A lease left by an older fedbip (no ``restarted``, ``latest`` the gone revision):
    --takeover no longer aborts on that client's latest adapter; the others publish and
    the next round starts it over."""
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    bob_repo = fed.member("bob").repo_id
    gone = fed.state().client("bob").personalized_history[-1]
    _recreate_local(fed, tmp_path, "bob")
    bob_push = push_fresh(fed, tmp_path, "bob", seed=31, group=0)
    push_fresh(fed, tmp_path, "alice", seed=32, group=0)  # the round is not empty without bob
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at("planned")).run()

    def as_an_old_plan(state) -> None:
        state.in_progress.pop("restarted")
        state.in_progress["latest"]["bob"] = gone

    _edit_state(fed, as_an_old_plan)
    resumed = run_round(fed, takeover=True)
    assert resumed["status"] == "completed" and resumed["round"] == 2
    assert reached(resumed) == ["alice", "carol"]
    reason = resumed["skipped"]["bob"]
    assert f"could not read its latest personalized adapter {bob_repo}@{gone[:12]}" in reason
    assert "NOT refused" in reason and "retried next round" in reason, reason
    state = fed.state()
    assert state.in_progress is None
    bob = state.client("bob")
    assert bob.personalized_history == [gone] and bob.refused_upload is None
    assert bob.consumed_commit != bob_push

    third = run_round(fed)
    assert third["status"] == "completed" and third["round"] == 3
    _assert_restarted(third, bob_repo)
    assert "bob" in third["outputs"] and third["inputs"]["bob"]["fresh"]
    assert third["inputs"]["bob"]["commit"] == bob_push
    assert _merge_record(fed, "bob")[1]["previous_revision"] is None
    assert fed.state().client("bob").personalized_history == [_merge_record(fed, "bob")[0]]


# -- over HTTP, against the local Hub ---------------------------------------------------
def _hub_federation(repo_id: str, tiny_base: Path, root: Path) -> tuple[Federation,
                                                                         Federation]:
    """The federation on the local Hub after one round: (server's view, clients' view)."""
    from federation_helpers import new_hub_federation
    from test_round_faults import _server

    new_hub_federation(repo_id, tiny_base, root)
    server = _server(repo_id, root)
    first = run_round(server)
    assert first["status"] == "completed" and reached(first) == sorted(CLIENTS)
    return server, Federation.at(repo_id, cache_dir=root / "client-cache")


def _recreate_on_hub(client_fed: Federation, root: Path, client: str, *, seed: int) -> str:
    """``client`` deletes its repo on the Hub, joins again and pushes from the init."""
    from huggingface_hub import HfApi

    repo = client_fed.member(client).repo_id
    HfApi().delete_repo(repo)
    assert not client_fed.store.repo_exists(repo)
    join(client_fed, client)
    assert client_fed.store.repo_exists(repo)
    return push_fresh(client_fed, root, client, seed=seed, group=CLIENTS[client])


def test_a_member_repo_recreated_on_the_hub_starts_over(hub, tmp_path, tiny_base):
    repo_id = "fedorg/recreated"
    server, clients = _hub_federation(repo_id, tiny_base, tmp_path)
    bob_repo = clients.member("bob").repo_id
    gone = server.state().client("bob").personalized_history[-1]
    bob_push = _recreate_on_hub(clients, tmp_path, "bob", seed=41)
    hub.clear_requests()

    second = run_round(server)
    assert second["status"] == "completed" and second["round"] == 2
    assert reached(second) == sorted(CLIENTS)
    assert second["skipped"] == {} and second["publish_failed"] == {}
    _assert_restarted(second, bob_repo)
    # a definite answer: the Hub said that revision does not exist (not a failure)
    assert any(r.method == "HEAD" and r.path.startswith(f"/{bob_repo}/resolve/{gone}/")
               and r.status == 404 for r in hub.requests)
    assert second["inputs"]["bob"]["commit"] == bob_push
    assert second["inputs"]["bob"]["staleness"] == 0
    bob_r2, bob_merge = _merge_record(server, "bob")
    assert bob_merge["previous_revision"] is None
    published_tensors(server, "bob")
    for client in ("alice", "carol"):  # republished when a fresh update reaches them
        published_tensors(server, client)
        assert len(server.state().client(client).personalized_history) == 1 + (
            client in second["outputs"])
    assert server.state().client("bob").personalized_history == [bob_r2]

    pulled = pull(clients, "bob", tmp_path / "bob-r2")
    assert pulled.revision == bob_r2
    push_fresh(clients, tmp_path, "bob", seed=42, group=0, start=pulled.folder)
    third = run_round(server)
    assert third["status"] == "completed" and third["restarted"] == {}
    assert third["skipped"] == {} and reached(third) == sorted(CLIENTS)
    assert third["inputs"]["bob"]["start_revision"] == bob_r2
    assert _merge_record(server, "bob")[1]["previous_revision"] == bob_r2


@pytest.mark.parametrize("status", [503, 429])
def test_a_transient_failure_is_not_taken_for_a_recreated_repo(status, hub, tmp_path,
                                                               tiny_base):
    repo_id = f"fedorg/flaky-gone-{status}"
    server, clients = _hub_federation(repo_id, tiny_base, tmp_path)
    bob_repo = clients.member("bob").repo_id
    before = server.state().client("bob")
    gone = before.personalized_history[-1]
    bob_push = _recreate_on_hub(clients, tmp_path, "bob", seed=51)
    push_fresh(clients, tmp_path, "alice", seed=52, group=0)
    # The check that bob's latest revision still exists: one HEAD of a file in it.
    fault = hub.inject_fault("HEAD", rf"^/{bob_repo}/resolve/{gone}/", status=status,
                             retry_after=0 if status == 429 else None, times=None)

    second = run_round(server)
    assert fault.hits == server.store.retries  # retried, then given up: not "gone"
    assert second["status"] == "completed" and second["round"] == 2
    assert second["restarted"] == {}
    assert reached(second) == ["alice", "carol"]
    reason = second["skipped"]["bob"]
    assert "could not check that its latest personalized adapter still exists" in reason
    assert f"HTTP {status}" in reason and "its history is kept" in reason, reason
    bob = server.state().client("bob")
    assert bob.personalized_history == before.personalized_history
    assert bob.consumed_commit == before.consumed_commit
    assert bob.consumed_upload == before.consumed_upload

    hub.clear_faults()
    third = run_round(server)
    assert third["status"] == "completed" and third["round"] == 3
    _assert_restarted(third, bob_repo)
    assert third["inputs"]["bob"]["commit"] == bob_push
    assert "bob" in third["outputs"]
    assert _merge_record(server, "bob")[1]["previous_revision"] is None


def test_a_failure_reading_one_latest_adapter_skips_that_client_only(hub, tmp_path,
                                                                     tiny_base):
    """The latest personalized adapters are fetched with the uploads, per client: a Hub
    failure on one (here after planning) skips that client, the others are published."""
    repo_id = "fedorg/latest-flaky"
    server, clients = _hub_federation(repo_id, tiny_base, tmp_path)
    bob_repo = clients.member("bob").repo_id
    latest = server.state().client("bob").personalized_history[-1]
    # from the init: its task vector does not read `latest`
    bob_push = push_fresh(clients, tmp_path, "bob", seed=61, group=0)
    push_fresh(clients, tmp_path, "alice", seed=62, group=0)
    faults = []

    def checkpoint(step: str) -> None:
        if step == "planned":
            faults.append(hub.inject_fault("GET", rf"^/{bob_repo}/resolve/{latest}/",
                                           status=503, times=None))

    second = RoundRunner(server, checkpoint=checkpoint).run()
    assert faults and faults[0].hits == server.store.retries
    assert second["status"] == "completed" and second["restarted"] == {}
    assert reached(second) == ["alice", "carol"]
    reason = second["skipped"]["bob"]
    assert f"could not read its latest personalized adapter {bob_repo}@{latest[:12]}" in \
        reason, reason
    assert "HTTP 503" in reason and "NOT refused" in reason, reason
    bob = server.state().client("bob")
    assert bob.personalized_history == [latest] and bob.refused_upload is None

    hub.clear_faults()
    third = run_round(server)
    assert third["status"] == "completed" and third["restarted"] == {}
    assert "bob" in third["outputs"] and third["inputs"]["bob"]["commit"] == bob_push
    assert _merge_record(server, "bob")[1]["previous_revision"] == latest
