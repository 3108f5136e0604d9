"""A round killed at any step, then re-run, ends exactly like an uninterrupted round:
no half-written or doubly-updated adapter, every upload consumed once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    Crash,
    crash_at,
    new_local_federation,
    publish_commits,
)
from federation_helpers import published_outputs as _outputs

from fedbip_hub.errors import RoundInProgressError
from fedbip_hub.federation import Federation
from fedbip_hub.memory import MEMORY_FILE
from fedbip_hub.rounds import RoundRunner, run_round

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
