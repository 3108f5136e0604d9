"""Configuration errors surface before a round takes its lease (the oracle's groups among
them), and the committed round record keeps its timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from federation_helpers import (
    CLIENTS,
    Crash,
    crash_at,
    new_local_federation,
    push_fresh,
    run_cli,
    set_strategy,
)

from fedbip_hub.engine.memory import MEMORY_FILE
from fedbip_hub.engine.strategies import Strategy, compute_weights
from fedbip_hub.errors import AdapterError, ConfigError, FedbipError
from fedbip_hub.federation.config import INIT_DIR, FederationConfig
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner, run_round

GROUPS = {"alice": "g0", "bob": "g0", "carol": "g1"}  # CLIENTS' true groups, named


def history(fed: Federation) -> list[str]:
    return [c.id for c in fed.store.history(fed.repo_id)]


# -- fedbip init ----------------------------------------------------------------------------
def test_init_refuses_the_oracle_without_groups(tmp_path: Path, tiny_base: Path) -> None:
    from fedbip_hub.federation.client import init_federation

    # The base model path does not exist: the refusal comes before anything is loaded.
    missing_base = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="oracle method needs the true task groups") as err:
        init_federation(str(tmp_path / "fed"), FederationConfig(
            name="o", base_model=missing_base, strategy={"method": "oracle"}))
    assert '"groups"' in err.value.hint and "--strategy-options" in err.value.hint
    assert not (tmp_path / "fed").exists()
    with pytest.raises(ConfigError, match=r"strategy in federation\.json is invalid"):
        init_federation(str(tmp_path / "fed"), FederationConfig(
            name="o", base_model=missing_base, strategy={"method": "fedbip", "rule": "x"}))

    fed = init_federation(str(tmp_path / "fed"), FederationConfig(
        name="o", base_model=str(tiny_base), num_labels=3,
        strategy={"method": "oracle", "groups": GROUPS}))
    assert fed.config().runnable_strategy().groups == GROUPS

    # Group names are member names.
    with pytest.raises(ConfigError, match="invalid client name 'bad name'"):
        Strategy.parse("oracle", groups={"bad name": "g"})
    with pytest.raises(ConfigError, match="alice has an empty group"):
        Strategy.parse("oracle", groups={"alice": ""})


def test_cli_init_refuses_the_oracle_without_groups(tmp_path: Path, tiny_base: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    refused = runner.invoke(app, ["init", str(tmp_path / "a"), "--base-model", str(tiny_base),
                                  "--strategy", "oracle", "--json"])
    assert refused.exit_code == 2, refused.output
    error = json.loads(refused.stdout)
    assert error["error"] == "ConfigError" and "groups" in error["hint"]
    assert not (tmp_path / "a").exists()
    made = runner.invoke(app, ["init", str(tmp_path / "b"), "--base-model", str(tiny_base),
                               "--num-labels", "3", "--strategy", "oracle",
                               "--strategy-options", json.dumps({"groups": GROUPS}), "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["config"]["strategy"] == {"method": "oracle",
                                                             "groups": GROUPS}


# -- the round ------------------------------------------------------------------------------
def test_compute_weights_reads_the_strategys_groups_and_an_explicit_list_wins() -> None:
    strategy = Strategy.parse("oracle", groups=GROUPS)
    table = compute_weights(strategy, k=3, clients=["alice", "bob", "carol"])
    assert table.matrices["model"].tolist() == [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]
    table = compute_weights(strategy, k=3, clients=["carol", "alice", "bob"])
    assert table.matrices["model"].tolist() == [[1, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]]
    explicit = compute_weights(strategy, k=3, groups=["x", "y", "x"],
                               clients=["alice", "bob", "carol"])
    assert explicit.matrices["model"].tolist() == [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]
    with pytest.raises(ConfigError, match="dave has no group") as err:
        compute_weights(strategy, k=2, clients=["alice", "dave"])
    assert err.value.client == "dave"
    with pytest.raises(ConfigError, match="needs the true task groups"):
        compute_weights(Strategy.parse("oracle"), k=2, clients=["alice", "bob"])


def _corrupt_init(fed: Federation) -> None:
    fed.store.commit(fed.repo_id, {f"{INIT_DIR}/adapter_config.json": b"{not json"},
                     message="test: break the initial adapter")


def _corrupt_memory(fed: Federation) -> None:
    fed.store.commit(fed.repo_id, {MEMORY_FILE: b"garbage"}, message="test: break the memory")


BROKEN = {
    "oracle without groups": (lambda fed: set_strategy(fed, method="oracle"), ConfigError,
                              "oracle method needs the true task groups"),
    "client missing from the groups": (
        lambda fed: set_strategy(fed, method="oracle", groups={"alice": "g0", "bob": "g0"}),
        ConfigError, "carol has no group"),
    "invalid strategy": (lambda fed: set_strategy(fed, rule="bogus"), ConfigError,
                         r"strategy in federation\.json is invalid"),
    "broken initial adapter": (_corrupt_init, AdapterError, "adapter_config.json"),
    "unreadable similarity memory": (_corrupt_memory, FedbipError, "unreadable"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_config_error_takes_no_lease(case: str, tmp_path: Path, tiny_base: Path) -> None:
    breaks, error, message = BROKEN[case]
    fed = new_local_federation(tmp_path, tiny_base)
    breaks(fed)
    before = history(fed)
    for takeover in (False, False, True):  # the same clear error every time, never "in
        with pytest.raises(error, match=message):  # progress"
            run_round(fed, takeover=takeover)
        assert history(fed) == before
        assert fed.state().in_progress is None and fed.state().round == 0


def test_the_server_job_reports_the_same_config_error_twice(tmp_path: Path,
                                                            tiny_base: Path) -> None:
    """The issue's story: `fedbip-server run` on an oracle without groups, then again."""
    fed = new_local_federation(tmp_path, tiny_base)
    set_strategy(fed, method="oracle")
    before = history(fed)
    env = {"FEDBIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        result = run_cli(["run", fed.address, "--json"], env, server=True, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        error = json.loads(result.stdout)
        assert error["error"] == "ConfigError" and "groups" in error["message"]
        assert "in progress" not in result.stdout
    assert history(fed) == before


def test_the_oracle_runs_with_the_strategys_groups_and_run_rounds_win(tmp_path: Path,
                                                                      tiny_base: Path) -> None:
    fed = new_local_federation(tmp_path, tiny_base)
    set_strategy(fed, method="oracle", groups=GROUPS)
    record = run_round(fed)
    assert record["status"] == "completed"
    assert record["clients"] == ["alice", "bob", "carol"]
    assert record["weights"]["model"] == [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]
    for i, (client, group) in enumerate(CLIENTS.items()):
        push_fresh(fed, tmp_path / "r2", client, seed=10 + i, group=group)
    record = run_round(fed, groups={"alice": "x", "bob": "y", "carol": "x"})
    assert record["weights"]["model"] == [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]


# -- timings --------------------------------------------------------------------------------
PHASES = {"plan", "download_validate", "compute", "publish"}


def _stored_record(fed: Federation, number: int) -> dict:
    return json.loads(fed.store.read_bytes(fed.repo_id, f"rounds/{number:06d}.json",
                                           fed.head()))


def test_the_committed_record_keeps_its_timings(tmp_path: Path, tiny_base: Path) -> None:
    from fedbip_hub.federation.modelcard import dashboard_card
    from fedbip_hub.federation.status import federation_status

    fed = new_local_federation(tmp_path, tiny_base)
    returned = run_round(fed)
    stored = _stored_record(fed, 1)
    timings = stored["timings"]
    assert set(timings) == PHASES | {"total"}  # everything measured up to the commit
    assert all(value > 0 for value in timings.values()), timings
    assert timings["total"] >= sum(timings[p] for p in PHASES) - 1e-3
    # The returned record adds the commit itself; the phases before it are the same.
    assert set(returned["timings"]) == PHASES | {"record", "total"}
    assert {p: returned["timings"][p] for p in PHASES} == {p: timings[p] for p in PHASES}
    assert returned["timings"]["total"] >= timings["total"]
    assert {k: v for k, v in stored.items() if k != "timings"} == {
        k: v for k, v in returned.items() if k not in ("timings", "bytes")}

    summary = federation_status(fed)
    assert summary["last_round"]["round"] == 1 and summary["round"] == 1
    readme = fed.store.read_bytes(fed.repo_id, "README.md", fed.head()).decode()
    assert readme == dashboard_card(fed.config(), fed.members(), fed.state(), stored)


def test_a_resumed_round_commits_its_timings_too(tmp_path: Path, tiny_base: Path) -> None:
    fed = new_local_federation(tmp_path, tiny_base)
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at("before-record")).run()
    run_round(fed, takeover=True)
    timings = _stored_record(fed, 1)["timings"]
    assert set(timings) == PHASES | {"total"} and all(v > 0 for v in timings.values())

