"""A round killed at any step, then re-run, ends exactly like an uninterrupted round:
no half-written or doubly-updated adapter, every upload consumed once."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    REPO_ROOT,
    Crash,
    crash_at,
    new_local_federation,
    publish_commits,
)
from federation_helpers import published_outputs as _outputs

from fedbip_hub.engine.memory import MEMORY_FILE
from fedbip_hub.errors import RoundInProgressError
from fedbip_hub.federation.client import latest_personalized_revision
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner, run_round

STEPS = ["planned", "downloaded", "computed", "published:alice", "published:bob",
         "before-record"]


def _summary(fed: Federation) -> dict:
    state = fed.state()
    return {"round": state.round, "in_progress": state.in_progress,
            "versions": {c: len(s.personalized_history) for c, s in state.clients.items()},
            "publish_commits": {c: publish_commits(fed, c) for c in CLIENTS},
            # the similarity memory is replaced once, by the round's completion commit
            "memory": hashlib.sha256(fed.store.read_bytes(
                fed.repo_id, MEMORY_FILE, fed.head())).hexdigest(),
            "memory_commits": sum(1 for h in fed.store.history(fed.repo_id)
                                  if h.title.endswith("completed"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("clean"), tiny_base)
    run_round(fed)
    return _outputs(fed), _summary(fed)


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_resumes_to_the_uninterrupted_result(step, tmp_path, tiny_base,
                                                                 uninterrupted):
    fed = new_local_federation(tmp_path, tiny_base)
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at(step)).run()
    with pytest.raises(RoundInProgressError):  # the lease holds until taken over
        run_round(fed)
    record = run_round(fed, takeover=True)
    assert record["status"] == "completed" and record["round"] == 1
    expected_outputs, expected_summary = uninterrupted
    assert _summary(fed) == expected_summary
    for client, tensors in _outputs(fed).items():
        for key, value in expected_outputs[client].items():
            torch.testing.assert_close(tensors[key], value)
    assert run_round(fed)["status"] == "nothing-new"


# -- kill -9, for real, at many points, with concurrent takeovers ---------------------------
_DRIVER = """
import json, os, signal, sys
from fedbip_hub.federation.client import latest_personalized_revision
from fedbip_hub.errors import RoundInProgressError
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner

fed, step = Federation.at(sys.argv[1]), sys.argv[2]

def checkpoint(reached):
    if reached == step:
        os.kill(os.getpid(), signal.SIGKILL)

try:
    print(json.dumps({"status": RoundRunner(fed, takeover=True,
                                            checkpoint=checkpoint).run()["status"]}))
except RoundInProgressError:
    print(json.dumps({"status": "in-progress"}))
"""
# Each wave starts its jobs at once, every one with --takeover: a job dies by SIGKILL when
# it reaches its step (a round checkpoint), or after a delay (anywhere, store writes
# included); "-" never kills. The last wave finishes the round.
WAVES = [["planned"], ["downloaded", "downloaded"], ["published:alice"] * 3,
         ["published:bob", 5.0], ["before-record", "before-record"], [2.0, 4.0],
         ["-", "-", "-"]]


def _driver(fed: Federation, kill, cache: Path) -> tuple[subprocess.Popen, float | None]:
    step = kill if isinstance(kill, str) else "-"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, fed.address, step],
                            cwd=REPO_ROOT, env={**os.environ, "FEDBIP_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, kill if isinstance(kill, float) else None


def test_kill_9_at_many_points_with_concurrent_takeovers_converges(tmp_path, tiny_base,
                                                                   uninterrupted):
    fed = new_local_federation(tmp_path, tiny_base)
    outcomes: list[tuple[object, int, str]] = []
    for wave, kills in enumerate(WAVES):
        jobs = [_driver(fed, kill, tmp_path / f"cache-{wave}-{i}")
                for i, kill in enumerate(kills)]
        began = time.monotonic()
        for (proc, delay), kill in zip(jobs, kills, strict=True):
            if delay is not None:
                try:
                    proc.wait(timeout=max(0.0, began + delay - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=300)
            assert "Traceback" not in err, err
            outcomes.append((kill, proc.returncode, out.strip()))
    assert [o for o in outcomes if o[1] not in (0, -signal.SIGKILL)] == [], outcomes
    finished = [o for o in outcomes if '"completed"' in o[2]]
    assert len(finished) == 1, outcomes  # the round completed once, in whichever wave
    expected_outputs, expected_summary = uninterrupted
    assert _summary(fed) == expected_summary
    for client, tensors in _outputs(fed).items():
        for key, value in expected_outputs[client].items():
            assert torch.equal(tensors[key], value), (client, key)
    state = fed.state()
    for client in CLIENTS:  # history holds the one publish that `fedbip pull` finds
        latest = latest_personalized_revision(fed, fed.member(client).repo_id)
        assert state.client(client).personalized_history == [latest]
    assert run_round(fed)["status"] == "nothing-new"
