"""The federation's own files are checked when read: a broken or rolled-back one is
refused with one clear line and the fix, never a traceback, and never acted on.

* state.json, federation.json, the lease (state.json's ``in_progress``) and round records
  that are not what fedbip wrote stop `fedbip-server run` and `fedbip status` with a
  ConfigError naming the file, the field and how to restore it;
* a broken ``members/x.json`` stops no one else: that file is skipped, with its reason;
* a state.json older than the round records beside it (rolled back to ``{"round": 0}``)
  is refused before anything is written: no round is re-run, no record overwritten, and
  once the state is restored the next upload is accepted as usual.
"""

from __future__ import annotations

import json

import pytest
from federation_helpers import (
    Crash,
    crash_at,
    new_local_federation,
    pull_and_push,
)
from typer.testing import CliRunner

from cli.main import app as fedbip_app
from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.config import FEDERATION_FILE, MEMBERS_DIR, STATE_FILE, dump_json
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.status import federation_status
from fedbip_hub.server.rounds import RoundRunner, run_round
from server_job.main import app as server_app


def _write(fed: Federation, files: dict[str, bytes], message: str = "test: tamper") -> str:
    return fed.store.commit(fed.repo_id, files, message=message)


def _assert_one_clear_error(args: list[str], *, app=server_app, mentions: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == ConfigError.exit_code, (result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert mentions in " ".join(lines), result.stderr
    assert any(line.startswith("Hint:") for line in lines), result.stderr
    return result.stderr


GARBAGE_STATES = {
    "not json": b"{not json",
    "a list": b"[]",
    "a negative round": b'{"round": -1}',
    "a client that is a number": b'{"round": 0, "clients": {"alice": 5}}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("content", GARBAGE_STATES.values(), ids=GARBAGE_STATES.keys())
def test_a_garbage_state_is_refused_with_the_fix(content, tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    head = _write(fed, {STATE_FILE: content})
    text = _assert_one_clear_error(["run", fed.address], mentions="state.json")
    assert "Restore state.json" in text
    _assert_one_clear_error(["status", fed.address], app=fedbip_app, mentions="state.json")
    assert fed.head() == head  # nothing was written


@pytest.mark.parametrize("content", [b"nope", b"[]", b'{"name": 5}'])
def test_a_garbage_federation_json_is_refused_with_the_fix(content, tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    head = _write(fed, {FEDERATION_FILE: content})
    _assert_one_clear_error(["run", fed.address], mentions="federation.json")
    assert fed.head() == head


@pytest.mark.parametrize("lease", [{"round": "x"}, {"plan_id": "p"}])
def test_a_garbage_lease_is_refused_with_the_fix(lease, tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    state = fed.state()
    state.in_progress = lease
    head = _write(fed, {STATE_FILE: dump_json(state)})
    text = _assert_one_clear_error(["run", fed.address, "--takeover"], mentions="lease")
    assert "in_progress" in text
    assert fed.head() == head


def test_a_garbage_round_record_is_refused_by_status(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    _write(fed, {"rounds/000001.json": b"[1, 2]"})
    _assert_one_clear_error(["status", fed.address], app=fedbip_app,
                            mentions="rounds/000001.json")


@pytest.mark.parametrize("content", [b"[]", b"{bad", b'{"name": "bob", "repo_id": "x/y"}',
                                     b'{"name": "mallory"}'])
def test_a_broken_member_file_skips_that_file_only(content, tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    _write(fed, {f"{MEMBERS_DIR}/mallory.json": content})
    record = run_round(fed)
    assert record["status"] == "completed"
    assert sorted(record["outputs"]) == ["alice", "bob", "carol"]
    assert fed.member("bob").repo_id == "clients/bob"  # never redirected by another file
    why = record["skipped"][f"{MEMBERS_DIR}/mallory.json"]
    assert "members/mallory.json" in why and "fix:" in why and "\n" not in why
    status = federation_status(fed)
    assert [m["name"] for m in status["members"]] == ["alice", "bob", "carol"]
    assert list(status["member_problems"]) == [f"{MEMBERS_DIR}/mallory.json"]
    with pytest.raises(ConfigError, match="membership file of mallory is broken"):
        fed.member("mallory")


def test_a_rolled_back_state_is_refused_and_never_overwrites_a_record(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    completed = fed.head()
    record = fed.store.read_bytes(fed.repo_id, "rounds/000001.json", completed)
    pull_and_push(fed, tmp_path, "alice", seed=11, group=0)
    head = _write(fed, {STATE_FILE: b'{"round": 0}'}, "someone rolls the state back")

    text = _assert_one_clear_error(["run", fed.address], mentions="rolled back")
    assert completed in text  # the fix names the commit to restore state.json from
    _assert_one_clear_error(["run", fed.address, "--takeover"], mentions="rolled back")
    assert fed.head() == head  # no lease, no round, no record rewritten
    assert fed.store.read_bytes(fed.repo_id, "rounds/000001.json", head) == record

    # The fix: restore state.json from that commit; alice's upload is then accepted.
    _write(fed, {STATE_FILE: fed.store.read_bytes(fed.repo_id, STATE_FILE, completed)})
    second = run_round(fed)
    assert second["round"] == 2 and second["inputs"]["alice"]["fresh"]
    assert "alice" not in second["skipped"] and "alice" in second["outputs"]


def test_a_round_record_written_while_the_round_ran_is_not_overwritten(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    foreign = json.dumps({"round": 1, "plan_id": "someone-else"}).encode()

    def meddle(step: str) -> None:
        if step == "before-record":  # the state is rolled back under the running round
            _write(fed, {"rounds/000001.json": foreign})

    with pytest.raises(ConfigError, match="rolled back"):
        RoundRunner(fed, checkpoint=meddle).run()
    assert fed.store.read_bytes(fed.repo_id, "rounds/000001.json", fed.head()) == foreign
    assert fed.state().round == 0 and fed.state().in_progress is not None


def test_a_crashed_round_is_not_mistaken_for_a_rollback(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at("before-record")).run()
    assert run_round(fed, takeover=True)["status"] == "completed"
