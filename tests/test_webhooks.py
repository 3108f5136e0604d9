"""Webhook-triggered rounds: the job reacts to client uploads only (never to its own
personalized/ pushes), triggers during a round coalesce into one follow-up round, and
``fedbip-server webhook`` creates the Hub webhook (checked over HTTP on the local Hub)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from federation_helpers import run_cli, save_tiny_base, write_upload
from huggingface_hub import HfApi
from typer.testing import CliRunner

from fedbip_hub.errors import FedbipError, RoundInProgressError
from fedbip_hub.federation.client import PUBLISH_TITLE, init_federation, join, push, upload_id
from fedbip_hub.federation.config import FederationConfig, LoraSpec
from fedbip_hub.federation.repo import Federation
from fedbip_hub.scheduling.followups import (
    PENDING_FILE,
    read_pending,
    request_followup,
    run_with_followups,
)
from fedbip_hub.scheduling.webhooks import classify, run_job
from fedbip_hub.server.rounds import run_round
from fedbip_hub.testing.hub_server import HubServer
from server_job.main import app

CLIENTS = {"alice": 0, "bob": 0, "carol": 1}
SECRET = "0123456789abcdef0123456789abcdef"
SIGNED = {"secret": SECRET, "expected_secret": SECRET}  # what the Hub and the job hold
SIGNED_ENV = {"WEBHOOK_SECRET": SECRET, "FEDBIP_WEBHOOK_SECRET": SECRET}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base") / "base")


def _federation(root: Path, base_dir: Path) -> Federation:
    config = FederationConfig(name="t", base_model=str(base_dir), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8), strategy={"method": "fedbip-l"})
    fed = init_federation(str(root / "fed"), config)
    for i, (client, group) in enumerate(CLIENTS.items()):
        join(fed, client)
        _push(fed, root, client, seed=i, group=group)
    return fed


def _push(fed: Federation, root: Path, client: str, *, seed: int, group: int) -> str:
    upload = write_upload(fed.init_folder(), root / f"up-{client}-{seed}", seed=seed,
                          group=group, rank=4)
    return push(fed, client, upload, n_examples=10).commit


def payload(repo_id: str, *, old: str | None = None, new: str | None = None,
            scope: str = "repo.content", action: str = "update", ref: str = "refs/heads/main",
            head_sha: str | None = None, refs: bool = True) -> str:
    """A WEBHOOK_PAYLOAD as the Hub sends it (huggingface_hub's WebhookPayload, v3)."""
    body: dict = {
        "event": {"action": action, "scope": scope},
        "repo": {"id": "6548b2a4f1c1b3e0a2d0c001", "owner": {"id": "6548b2a4f1c1b3e0a2d0c002"},
                 "name": repo_id, "private": True, "type": "model", "head_sha": head_sha,
                 "url": {"web": f"https://huggingface.co/{repo_id}",
                         "api": f"https://huggingface.co/api/models/{repo_id}"}},
        "webhook": {"id": "6548b2a4f1c1b3e0a2d0c003", "version": 3},
    }
    if refs:
        body["updatedRefs"] = [{"ref": ref, "oldSha": old, "newSha": new}]
    return json.dumps(body)


def _heads(fed: Federation) -> dict[str, str]:
    repos = [fed.repo_id] + [m.repo_id for m in fed.members().values()]
    return {r: fed.store.head(r) for r in repos}


def _titles(fed: Federation, repo_id: str) -> list[str]:
    return [c.title for c in fed.store.history(repo_id)]


# --------------------------------------------------------------------------- the filter


def test_the_jobs_own_push_is_ignored_and_a_client_upload_runs_a_round(tmp_path, base_dir):
    fed = _federation(tmp_path, base_dir)
    assert run_round(fed)["round"] == 1
    alice = fed.member("alice").repo_id
    published, uploaded = (c.id for c in fed.store.history(alice)[:2])
    assert _titles(fed, alice)[0] == f"{PUBLISH_TITLE} (round 1)"

    # The server's personalized/ push re-triggers the job: no round, no commit anywhere.
    before = _heads(fed)
    for event in (payload(alice, old=uploaded, new=published),
                  payload(alice, refs=False, head_sha=published)):  # parent looked up
        outcome = run_job(fed, **SIGNED, payload=event)
        assert outcome.status == "ignored" and outcome.records == []
        assert "personalized/" in outcome.trigger.reason
    assert _heads(fed) == before

    # A client upload does run a round, which consumes it.
    commit = _push(fed, tmp_path, "alice", seed=7, group=0)
    outcome = run_job(fed, **SIGNED, payload=payload(alice, old=published, new=commit))
    assert outcome.trigger.run and outcome.trigger.client == "alice"
    [record] = outcome.records
    assert record["status"] == "completed" and record["round"] == 2
    assert record["inputs"]["alice"]["fresh"] and record["inputs"]["alice"]["commit"] == commit
    assert not record["inputs"]["bob"]["fresh"]
    # ...whose own push is ignored in turn: the loop ends there.
    again = fed.store.history(alice)[0].id
    assert run_job(fed, **SIGNED, payload=payload(alice, old=commit, new=again)).status == "ignored"
    # A replayed event runs a round that finds nothing new and commits nothing.
    before = _heads(fed)
    replay = run_job(fed, **SIGNED, payload=payload(alice, old=published, new=commit))
    assert replay.records[0]["status"] == "nothing-new"
    assert _heads(fed) == before


def test_events_that_are_not_client_uploads_are_ignored(tmp_path, base_dir):
    fed = _federation(tmp_path, base_dir)
    alice = fed.member("alice").repo_id
    head = fed.store.head(alice)
    cases = {
        "federation repo": payload(fed.repo_id, new=fed.head()),
        "not a member": payload("clients/mallory", new=head),
        "discussion": payload(alice, new=head, scope="discussion"),
        "repo settings": payload(alice, new=head, scope="repo.config"),
        "other branch": payload(alice, new=head, ref="refs/heads/dev"),
        "deleted repo": payload(alice, new=head, action="delete"),
        "garbage": "{not json",
        "wrong shape": json.dumps({"event": {"scope": "repo.content"}}),
    }
    before = _heads(fed)
    for name, event in cases.items():
        trigger = classify(fed, event)
        assert not trigger.run, name
        assert run_job(fed, **SIGNED, payload=event).status == "ignored", name
    assert _heads(fed) == before
    # The first push to a new repo (old sha all zeros) is an upload.
    trigger = classify(fed, payload(alice, old="0" * 40, new=head))
    assert trigger.run and trigger.client == "alice" and trigger.commit == head


def test_run_command_filters_webhook_starts(tmp_path, base_dir):
    fed = _federation(tmp_path, base_dir)
    alice = fed.member("alice").repo_id
    env = {"WEBHOOK_PAYLOAD": payload(fed.repo_id, new=fed.head()), **SIGNED_ENV}
    # A real process, as HF Jobs starts it: exits 0 without a round.
    result = json.loads(run_cli(["run", fed.address, "--json"], env, server=True).stdout)
    assert result["ok"] and result["status"] == "ignored"
    assert result["trigger"]["repo_id"] == fed.repo_id
    assert fed.state().round == 0
    # A client upload event starts a round (in-process: the same typer app).
    head = fed.store.head(alice)
    out = CliRunner().invoke(app, ["run", fed.address, "--json"],
                             env={"WEBHOOK_PAYLOAD": payload(alice, new=head), **SIGNED_ENV})
    assert out.exit_code == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["status"] == "completed" and record["round"] == 1
    assert record["trigger"]["client"] == "alice" and "followups" not in record
    plain = CliRunner().invoke(app, ["run", fed.address], env={"WEBHOOK_PAYLOAD": ""})
    assert plain.exit_code == 0 and "Nothing new since round 1" in plain.stdout


@pytest.mark.parametrize("given, expected", [
    (None, SECRET), ("wrong-" + SECRET[6:], SECRET), (SECRET[:-1], SECRET), (SECRET, None)])
def test_a_webhook_start_without_the_right_secret_starts_no_round(given, expected,
                                                                  tmp_path, base_dir):
    fed = _federation(tmp_path, base_dir)
    alice = fed.member("alice").repo_id
    event = payload(alice, new=fed.store.head(alice))  # a perfect client-upload event
    head = fed.head()
    with pytest.raises(FedbipError, match="no round started") as err:
        run_job(fed, payload=event, secret=given, expected_secret=expected)
    assert "fedbip-server webhook" in (err.value.hint or "")
    assert fed.head() == head and fed.state().round == 0  # nothing read, nothing written
    env = {"WEBHOOK_PAYLOAD": event, "WEBHOOK_SECRET": given or "",
           "FEDBIP_WEBHOOK_SECRET": expected or ""}
    out = CliRunner().invoke(app, ["run", fed.address], env=env)
    assert out.exit_code != 0 and "no round started" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr and SECRET not in out.stdout + out.stderr
    assert fed.head() == head


def test_the_secret_is_compared_in_constant_time(monkeypatch):
    import hmac

    import fedbip_hub.scheduling.webhooks as webhooks

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(webhooks.hmac, "compare_digest",
                        lambda a, b: calls.append((a, b)) or real(a, b))
    webhooks.verify_secret(SECRET, SECRET)
    assert calls == [(SECRET.encode(), SECRET.encode())]


# --------------------------------------------------------------------------- coalescing


def test_triggers_during_a_round_coalesce_into_one_followup(tmp_path, base_dir):
    fed = _federation(tmp_path, base_dir)
    late: dict[str, str] = {}
    deferred = []

    def push_and_trigger_while_publishing(items, description):
        if description == "Publishing" and not late:  # round 1's inputs are pinned
            for seed, client in ((50, "alice"), (51, "bob")):
                repo = fed.member(client).repo_id
                old = fed.store.head(repo)
                late[client] = _push(fed, tmp_path, client, seed=seed, group=0)
                # The webhook starts a second job while this one holds the lease.
                other_job = Federation.at(fed.address)
                deferred.append(run_job(other_job, **SIGNED, payload=payload(repo, old=old,
                                                                   new=late[client])))
        return items

    outcome = run_with_followups(fed, progress=push_and_trigger_while_publishing)
    assert [d.status for d in deferred] == ["deferred", "deferred"]
    assert "in progress" in deferred[0].message
    rounds = [r["round"] for r in outcome.records]
    assert rounds == [1, 2]  # the round, then exactly one follow-up for both triggers
    first, followup = outcome.records
    late_ids = {}
    for client in ("alice", "bob"):
        repo = fed.member(client).repo_id
        late_ids[client] = upload_id(fed.store.read_bytes(repo, "fedbip_upload.json",
                                                          late[client]))
        assert first["inputs"][client]["upload_id"] != late_ids[client]
        assert followup["inputs"][client]["fresh"]
        assert followup["inputs"][client]["upload_id"] == late_ids[client]
    assert not followup["inputs"]["carol"]["fresh"]
    assert read_pending(fed) is None and outcome.pending is None
    titles = _titles(fed, fed.repo_id)
    assert titles.count("fedbip: follow-up round requested") == 2
    assert titles.count("fedbip: follow-up round started") == 1
    # Consumed exactly once: nothing is left for the next run.
    assert run_round(fed)["status"] == "nothing-new"
    state = fed.state()
    assert state.round == 2
    assert state.clients["alice"].consumed_upload == late_ids["alice"]
    assert len(state.clients["alice"].personalized_history) == 2
    # carol had nothing new in the follow-up: republished only if a fresh update reached it
    assert len(state.clients["carol"].personalized_history) == 1 + ("carol" in
                                                                     followup["outputs"])


def test_a_trigger_that_finds_the_round_just_ended_runs_it_itself(tmp_path, base_dir):
    fed = _federation(tmp_path, base_dir)
    alice = fed.member("alice").repo_id
    calls = []

    def round_ended_meanwhile(fed_, **options):
        calls.append(options)
        if len(calls) == 1:  # saw a lease, which was released before the marker
            raise RoundInProgressError("round 1 is in progress (job x).")
        return run_round(fed_, **options)

    assert not request_followup(fed, {"reason": "test"})  # no round in progress
    outcome = run_job(fed, **SIGNED, payload=payload(alice, new=fed.store.head(alice)),
                      round_fn=round_ended_meanwhile)
    assert outcome.status == "completed" and [r["round"] for r in outcome.records] == [1]
    assert len(calls) == 2 and read_pending(fed) is None
    assert "fedbip: follow-up round requested" not in _titles(fed, fed.repo_id)


def test_followups_are_bounded_and_plain_runs_still_refuse_overlap(tmp_path, base_dir):
    fed = _federation(tmp_path, base_dir)
    count = []

    def busy(fed_, **options):  # every round sees a new trigger arrive
        count.append(1)
        fed_.store.commit(fed_.repo_id, {PENDING_FILE: json.dumps({"count": len(count)})
                                         .encode()}, message="trigger")
        return {"status": "nothing-new", "round": 0}

    outcome = run_with_followups(fed, round_fn=busy, max_followups=2)
    assert len(outcome.records) == 3 and outcome.pending == {"count": 3}
    assert outcome.to_dict()["followups"] == outcome.records[1:]

    def in_progress(fed_, **options):
        raise RoundInProgressError("round 1 is in progress (job x).")

    with pytest.raises(RoundInProgressError):  # cron / schedule / by hand: as before
        run_with_followups(fed, round_fn=in_progress)
    dry = run_with_followups(fed, round_fn=busy, dry_run=True)
    assert len(dry.records) == 1  # a dry run takes no marker


# --------------------------------------------------------------------------- the Hub webhook


def _hub_federation(hub: HubServer, members: list[str]) -> None:
    files = {f"members/{m}.json": json.dumps({"name": m, "repo_id": f"fedorg/fed-{m}"})
             for m in members}
    hub.create_repo("fedorg/fed", files={"federation.json": "{}", **files})


def _webhook_cli(*args: str, env: dict | None = None, code: int = 0):
    out = CliRunner().invoke(app, ["webhook", *args], env=env)
    assert out.exit_code == code, (out.stdout, out.stderr, out.exception)
    assert "hf_" not in out.stdout + out.stderr
    return out


def test_webhook_command_creates_then_updates_the_hub_webhook(hub: HubServer) -> None:
    _hub_federation(hub, ["alice", "bob"])
    job_token = "hf_jobBotToken0123456789abcdef"
    out = _webhook_cli("create", "fedorg/fed", "--json", env={"FEDBIP_JOB_TOKEN": job_token})
    hook = json.loads(out.stdout)["webhook"]
    [source] = [c for c in hub.api_calls if (c.method, c.path) == ("POST", "/api/jobs/fed-admin")]
    assert source.body["secrets"] == {"HF_TOKEN": job_token}
    assert "exec fedbip-server run fedorg/fed" in source.body["command"][2]
    [create] = [c for c in hub.api_calls
                if (c.method, c.path) == ("POST", "/api/settings/webhooks")]
    assert create.body == {
        "watched": [{"type": "model", "name": "fedorg/fed-alice"},
                    {"type": "model", "name": "fedorg/fed-bob"}],
        "domains": ["repo"],
        "secret": create.body["secret"],
        "jobSourceId": hook["job_id"],
        # the job checks the secret the Hub passes it against its own copy
        "secrets": {"HF_TOKEN": job_token, "FEDBIP_WEBHOOK_SECRET": create.body["secret"]},
    }
    signing = create.body["secret"]
    assert re.fullmatch(r"[0-9a-f]{32}", signing)
    assert hook["action"] == "created"
    assert hook["secrets"] == ["FEDBIP_WEBHOOK_SECRET", "HF_TOKEN"]
    assert signing not in out.stdout + out.stderr  # names only, never values
    assert hook["job_id"] in hub.jobs and "started now" in hook["job_source"]
    assert hub.webhooks[hook["id"]]["secrets"] == {"HF_TOKEN": job_token,
                                                   "FEDBIP_WEBHOOK_SECRET": signing}

    # A new member joins: re-running updates the same webhook (and reuses the given job).
    hub.create_repo("fedorg/fed-x", files={})
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.upload_file(path_or_fileobj=json.dumps({"name": "carol", "repo_id": "fedorg/fed-carol"})
                    .encode(), path_in_repo="members/carol.json", repo_id="fedorg/fed")
    again = json.loads(_webhook_cli("create", "fedorg/fed", "--job-id", hook["job_id"],
                                    "--json").stdout)
    assert again["webhook"]["id"] == hook["id"] and again["webhook"]["action"] == "updated"
    assert len(hub.webhooks) == 1 and len(hub.jobs) == 1
    assert [w["name"] for w in hub.webhooks[hook["id"]]["watched"]] == [
        "fedorg/fed-alice", "fedorg/fed-bob", "fedorg/fed-carol"]
    assert hub.webhooks[hook["id"]]["domains"] == ["repo"]
    # the update keeps the signing secret and the job's copy of it in line
    assert hub.webhooks[hook["id"]]["secret"] == signing
    assert hub.webhooks[hook["id"]]["secrets"]["FEDBIP_WEBHOOK_SECRET"] == signing

    listed = json.loads(_webhook_cli("list", "--json").stdout)["webhooks"]
    assert [w["id"] for w in listed] == [hook["id"]]
    assert "watches" in _webhook_cli("list").stdout
    _webhook_cli("delete", hook["id"])
    assert hub.webhooks == {}


def test_webhook_reuses_the_scheduled_jobs_last_run(hub: HubServer) -> None:
    _hub_federation(hub, ["alice"])
    created = CliRunner().invoke(app, ["schedule", "create", "fedorg/fed", "--every", "@hourly",
                                       "--json"])
    scheduled = json.loads(created.stdout)["scheduled_job"]["id"]
    run = HfApi().trigger_scheduled_job(scheduled_job_id=scheduled)
    hook = json.loads(_webhook_cli("create", "fedorg/fed", "--json").stdout)["webhook"]
    assert hook["job_id"] == run.id and scheduled in hook["job_source"]
    assert not [c for c in hub.api_calls if (c.method, c.path) == ("POST", "/api/jobs/fed-admin")]
    assert hook["command"] == hub.jobs[run.id]["spec"]["command"]


def test_webhook_needs_members_and_a_hub_federation(hub: HubServer, tmp_path) -> None:
    _hub_federation(hub, [])
    out = _webhook_cli("create", "fedorg/fed", "--json", code=1)
    assert "no members" in json.loads(out.stdout)["message"]
    out = _webhook_cli("create", str(tmp_path), "--json", code=2)
    assert json.loads(out.stdout)["error"] == "ConfigError"
