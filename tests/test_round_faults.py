"""Server rounds against the local Hub while the network misbehaves.

Transient failures (5xx, 429 with Retry-After, timeouts, dropped connections) are retried
and the round ends exactly like a clean one; a member whose repo answers 401/403/404 for
good is skipped with a reason while the others proceed; a revoked server token gives one
clear error; two server jobs started at once apply the round once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    finish_all,
    new_hub_federation,
    new_local_federation,
    start_server_job,
)
from federation_helpers import published_outputs as _outputs

from fedbip_hub.federation.client import PUBLISH_TITLE, init_federation
from fedbip_hub.federation.config import FederationConfig
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import run_round
from fedbip_hub.stores import HubStore
from fedbip_hub.testing.hub_server import INVALID_CREDENTIALS

TIMEOUT = 1.0  # the server store's per-request timeout; injected delays exceed it


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    """The same federation on the local-folder store, one clean round: the reference."""
    fed = new_local_federation(tmp_path_factory.mktemp("clean"), tiny_base)
    return run_round(fed), _outputs(fed)


def _server(repo_id: str, root: Path) -> Federation:
    """The federation as the server job sees it, with a short timeout and backoff."""
    store = HubStore(cache_dir=root / "server-cache", timeout=TIMEOUT, backoff=0.05)
    return Federation(store, repo_id, repo_id)


def _assert_same_as_clean(fed: Federation, record: dict, clean) -> None:
    clean_record, clean_outputs = clean
    assert record["status"] == "completed" and record["round"] == 1
    assert sorted(record["outputs"]) == sorted(CLIENTS)
    assert record["weights"] == clean_record["weights"]
    assert record["cosine"] == clean_record["cosine"]
    for client, tensors in _outputs(fed).items():
        assert tensors.keys() == clean_outputs[client].keys()
        for key, value in clean_outputs[client].items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    state = fed.state()
    assert state.round == 1 and state.in_progress is None
    for client in CLIENTS:  # published once, never twice
        repo = fed.member(client).repo_id
        titles = [c.title for c in fed.store.history(repo)]
        assert sum(t.startswith(PUBLISH_TITLE) for t in titles) == 1, (client, titles)
        assert len(state.clients[client].personalized_history) == 1
    titles = [c.title for c in fed.store.history(fed.repo_id)]
    assert titles.count("fedbip: round 1 started") == 1
    assert titles.count("fedbip: round 1 completed") == 1


def test_transient_faults_are_retried_and_the_round_matches_a_clean_one(
        hub, tmp_path, tiny_base, clean, monkeypatch):
    new_hub_federation("fedorg/flaky", tiny_base, tmp_path)
    sleeps: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (sleeps.append(s), real_sleep(s))[1])
    faults = [
        # 5xx on downloads, on listings and on the lease commit (answered, not applied)
        hub.inject_fault("GET", r"/fedorg/flaky-alice/resolve/.*adapter_model", status=503,
                         times=2),
        hub.inject_fault("GET", r"/api/models/fedorg/flaky/tree/", status=500, times=1),
        hub.inject_fault("POST", r"/api/models/fedorg/flaky/commit/", status=502, times=1),
        # 429 with Retry-After on a member's listing
        hub.inject_fault("GET", r"/api/models/fedorg/flaky-bob/tree/", status=429,
                         retry_after=1, times=1),
        # timeouts: a download, and a publish commit the Hub applies after we gave up
        hub.inject_fault("GET", r"/fedorg/flaky-carol/resolve/.*fedbip_upload", status=None,
                         delay=TIMEOUT * 2.5, times=1),
        hub.inject_fault("POST", r"/api/models/fedorg/flaky-bob/commit/", status=None,
                         delay=TIMEOUT * 2.5, times=1),
        # a dropped connection, on the listing of the members' heads
        hub.inject_fault("GET", r"^/api/models$", disconnect=True, times=1),
    ]
    fed = _server("fedorg/flaky", tmp_path)
    record = run_round(fed)
    assert [f.hits for f in faults] == [f.times for f in faults]
    assert record["skipped"] == {}
    assert 1.0 in sleeps  # the 429's Retry-After was honoured
    hub.clear_faults()
    _assert_same_as_clean(fed, record, clean)
    assert run_round(fed)["status"] == "nothing-new"


def test_a_member_repo_that_refuses_for_good_is_skipped_and_the_others_proceed(
        hub, tmp_path, tiny_base, clean):
    members = {**CLIENTS, "dave": 0, "erin": 1, "frank": 0}
    new_hub_federation("fedorg/perm", tiny_base, tmp_path, members)
    hub.inject_fault(None, r"fedorg/perm-dave/", status=401, message=INVALID_CREDENTIALS,
                     times=None)
    hub.inject_fault(None, r"fedorg/perm-erin/", status=403, times=None)
    hub.inject_fault(None, r"fedorg/perm-frank/", status=404, error_code="RepoNotFound",
                     times=None)
    fed = _server("fedorg/perm", tmp_path)
    hub.clear_requests()
    record = run_round(fed)
    skipped = record["skipped"]
    assert sorted(skipped) == ["dave", "erin", "frank"]
    assert "rejected the token (401" in skipped["dave"]
    assert "no rights for this on fedorg/perm-erin (403)" in skipped["erin"]
    assert "repo fedorg/perm-frank not found" in skipped["frank"]
    assert all("(fix: " in reason for reason in skipped.values())
    assert all(f"/{c}/resolve/" not in r.path for r in hub.requests
               for c in ("perm-dave", "perm-erin", "perm-frank"))
    hub.clear_faults()
    _assert_same_as_clean(fed, record, clean)


def test_a_revoked_server_token_gives_one_clear_error(hub, hub_env, tmp_path, tiny_base):
    token = "hf_revokedBotToken0123456789"
    hub.add_token(token, "fed-bot", orgs=("fedorg",))
    hub.revoke_token(token)
    config = FederationConfig(name="r", base_model=str(tiny_base), num_labels=3)
    init_federation("fedorg/revoked", config)
    proc = start_server_job({**hub_env, "HF_TOKEN": token, "FEDBIP_CACHE": str(tmp_path)},
                       "fedorg/revoked")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in err and "Traceback" not in out
    assert "revokedBotToken" not in out + err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert "rejected the token" in errors[0] and "401" in errors[0]
    assert any(line.startswith("Hint:") and "HF_TOKEN" in line for line in lines), err


def test_two_server_jobs_at_once_apply_the_round_once(hub, hub_env, tmp_path, tiny_base,
                                                       clean):
    new_hub_federation("fedorg/twice", tiny_base, tmp_path)
    env = {**hub_env, "FEDBIP_CACHE": str(tmp_path / "jobs-cache")}
    procs = [start_server_job(env, "fedorg/twice", "--json") for _ in range(2)]
    outputs = finish_all(procs)
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]
    for code, _out, err in results:
        assert code == 0, err  # the loser exits cleanly too: schedulers see no failure
        assert "Traceback" not in err
    payloads = [json.loads(out) for _code, out, _err in results]
    statuses = sorted(p["status"] for p in payloads)
    assert statuses in (["completed", "in-progress"], ["completed", "nothing-new"]), payloads
    loser = next(p for p in payloads if p["status"] != "completed")
    if loser["status"] == "in-progress":
        assert "round 1" in loser["message"] and "--takeover" in loser["message"]
    _assert_same_as_clean(Federation.at("fedorg/twice", cache_dir=tmp_path / "check"),
                          next(p for p in payloads if p["status"] == "completed"), clean)
