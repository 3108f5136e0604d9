"""The round lease is exclusive, even under concurrent ``--takeover``.

A round that died holds its lease. Several jobs started at once with --takeover (a
scheduler retry, an impatient operator, a webhook) must still resume it once: exactly one
claims the lease (a commit on the head it read, so the others lose the race), a job
whose lease was taken over stops before its next write, and every member's adapter is
published once, by the plan, whichever job gets there. The federation then ends bitwise
like an uninterrupted round, and the next upload trained from `fedbip pull` is accepted.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    Crash,
    crash_at,
    finish_all,
    new_hub_federation,
    new_local_federation,
    publish_commits,
    pull_and_push,
    start_server_job,
)
from federation_helpers import published_outputs as _outputs

from fedbip_hub.errors import RoundInProgressError
from fedbip_hub.federation.client import latest_personalized_revision
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.lease import plan_or_resume
from fedbip_hub.server.rounds import RoundRunner, run_round
from fedbip_hub.stores import HubStore, LocalStore

JOBS = 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("clean"), tiny_base)
    record = run_round(fed)
    return record, _outputs(fed)


def assert_like_uninterrupted(fed: Federation, uninterrupted) -> None:
    """Bitwise the uninterrupted round's adapters and weights, one publish per member,
    each member's history holding exactly its one publish, one completion."""
    clean_record, clean_outputs = uninterrupted
    state = fed.state()
    assert state.round == 1 and state.in_progress is None
    record = fed.round_record(1)
    assert record["weights"] == clean_record["weights"]
    for client, tensors in _outputs(fed).items():
        assert tensors.keys() == clean_outputs[client].keys()
        for key, value in clean_outputs[client].items():
            assert torch.equal(tensors[key], value), (client, key)
    for client in CLIENTS:
        assert publish_commits(fed, client) == 1, client
        latest = latest_personalized_revision(fed, fed.member(client).repo_id)
        assert state.client(client).personalized_history == [latest], client
        assert record["outputs"][client]["commit"] == latest
    titles = [c.title for c in fed.store.history(fed.repo_id)]
    assert titles.count("fedbip: round 1 completed") == 1, titles


class Gate:
    """A checkpoint that holds every job reaching ``step`` until all ``jobs`` have (or a
    few seconds have passed): jobs that got that far then publish at the same moment, the
    race a lease must make impossible."""

    def __init__(self, jobs: int, step: str = "computed", patience: float = 3.0):
        self.jobs, self.step, self.patience = jobs, step, patience
        self.arrived = 0
        self._cond = threading.Condition()

    def __call__(self, step: str) -> None:
        if step != self.step:
            return
        with self._cond:
            self.arrived += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.arrived >= self.jobs, timeout=self.patience)


def _concurrently(jobs: list) -> list:
    """Run the callables at once (released together by a barrier); results or errors."""
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        try:
            return job()
        except RoundInProgressError as exc:
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


@pytest.mark.parametrize("step", ["planned", "published:alice", "published:bob"])
def test_concurrent_takeovers_on_the_local_store_resume_the_round_once(
        step, tmp_path, tiny_base, uninterrupted):
    fed = new_local_federation(tmp_path, tiny_base)
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at(step)).run()
    root = fed.store.root
    gate = Gate(JOBS)

    def job(index: int):
        store = LocalStore(root, cache_dir=tmp_path / f"cache-{index}")
        return lambda: run_round(Federation(store, fed.repo_id, str(root)), takeover=True,
                                 checkpoint=gate)

    results = _concurrently([job(i) for i in range(JOBS)])
    assert gate.arrived == 1  # one job resumed the round; the others never computed
    completed = [r for r in results if isinstance(r, dict)]
    assert len(completed) == 1, results
    assert completed[0]["status"] == "completed"
    assert all(isinstance(r, RoundInProgressError) for r in results if r is not completed[0])
    assert_like_uninterrupted(fed, uninterrupted)
    # the next upload, trained from what `fedbip pull` gives, is accepted
    pull_and_push(fed, tmp_path, "alice", seed=30, group=0)
    record = run_round(fed)
    assert record["status"] == "completed" and "alice" not in record["skipped"], record
    assert record["inputs"]["alice"]["fresh"] and record["inputs"]["alice"]["staleness"] == 0


def test_a_job_whose_lease_was_taken_over_stops_before_its_next_publish(
        tmp_path, tiny_base, uninterrupted):
    """The "dead" job was only slow: it wakes up after another job took its lease over."""
    fed = new_local_federation(tmp_path, tiny_base)
    other = Federation(LocalStore(fed.store.root, cache_dir=tmp_path / "other"),
                       fed.repo_id, fed.address)
    took_over: list[str] = []

    def slow(step: str) -> None:  # another job takes over while this one publishes
        if step == "published:alice" and not took_over:
            with pytest.raises(Crash):  # ... and dies in turn, after bob's publish
                RoundRunner(other, takeover=True, checkpoint=crash_at("published:bob")).run()
            took_over.append(other.state().in_progress["job_id"])

    with pytest.raises(RoundInProgressError, match="took over round 1"):
        RoundRunner(fed, checkpoint=slow).run()
    record = run_round(fed, takeover=True)
    assert record["status"] == "completed"
    assert {c: o.get("resumed", False) for c, o in record["outputs"].items()} == {
        "alice": True, "bob": True, "carol": False}
    assert_like_uninterrupted(fed, uninterrupted)


def test_takeover_only_takes_over_the_lease_it_found(tmp_path, tiny_base):
    """A takeover that loses the race to a new lease holder does not take that one over."""
    fed = new_local_federation(tmp_path, tiny_base)
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at("planned")).run()
    dead = fed.state().in_progress["job_id"]
    runner = RoundRunner(fed, takeover=True)
    head = fed.head()
    state = fed.state(head)
    config = fed.config(head)
    assert plan_or_resume(runner.context(), head, config, state,
                          first_holder=dead).plan is not None
    with pytest.raises(RoundInProgressError, match="in progress"):
        plan_or_resume(runner.context(), head, config, state, first_holder="another-job")


@pytest.mark.parametrize("crashed_at", [None, "planned"])
def test_concurrent_takeovers_over_http_run_the_round_once(crashed_at, hub, hub_env, tmp_path,
                                                            tiny_base, uninterrupted):
    """The issue's case (None: no round in progress; three jobs started with --takeover),
    and three takeovers of a round whose job died."""
    new_hub_federation("fedorg/takeover", tiny_base, tmp_path)
    if crashed_at is not None:
        fed = Federation(HubStore(cache_dir=tmp_path / "crashed"), "fedorg/takeover",
                         "fedorg/takeover")
        with pytest.raises(Crash):
            RoundRunner(fed, checkpoint=crash_at(crashed_at)).run()
    procs = [start_server_job({**hub_env, "FEDBIP_CACHE": str(tmp_path / f"job-{i}")},
                         "fedorg/takeover", "--takeover", "--json") for i in range(JOBS)]
    outputs = finish_all(procs)
    payloads = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        payloads.append(json.loads(out))
    statuses = sorted(p["status"] for p in payloads)
    assert statuses == ["completed"] + ["in-progress"] * (JOBS - 1), payloads
    assert_like_uninterrupted(Federation.at("fedorg/takeover", cache_dir=tmp_path / "check"),
                              uninterrupted)
