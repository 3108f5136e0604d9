"""A change of the federation's merge settings between rounds re-merges and republishes
every member with an input, even with no fresh upload; an idle round with the same
settings still writes nothing (fedbip_hub.federation.settings)."""

from __future__ import annotations

import json

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    Crash,
    crash_at,
    json_output,
    new_hub_federation,
    new_local_federation,
    peft_delta,
    publish_commits,
    pull_and_push,
    run_cli,
    set_strategy,
)
from safetensors.torch import load_file, save_file

from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.engine.strategies import Strategy
from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.client import latest_personalized_revision
from fedbip_hub.federation.config import (
    FEDERATION_FILE,
    PERSONALIZED_DIR,
    FederationConfig,
    LoraSpec,
    dump_json,
)
from fedbip_hub.federation.reconfigure import set_strategy_options
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.settings import (
    changed_settings,
    describe_changes,
    fingerprint,
    merge_settings,
    stated_changes,
)
from fedbip_hub.federation.status import federation_status
from fedbip_hub.server.rounds import RoundRunner, run_round


def _edit_config(fed, **fields) -> None:
    """Commit federation.json with top-level ``fields`` replaced."""
    config = fed.config().model_copy(update=fields)
    fed.store.commit(fed.repo_id, {FEDERATION_FILE: dump_json(config)},
                     message="test: edit the config")


def _published_folder(fed, client: str):
    repo = fed.member(client).repo_id
    return fed.store.fetch_folder(repo, latest_personalized_revision(fed, repo),
                                  PERSONALIZED_DIR)


def _peft_rank(tiny_base, folder) -> int:
    """r as PEFT loads it, checked against the loaded lora_A factors' shapes."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(base, str(folder))
    ranks = {module.lora_A["default"].weight.shape[0] for name, module in
             model.named_modules() if hasattr(module, "lora_A") and "default" in
             getattr(module, "lora_A", {})}
    assert len(ranks) == 1, ranks
    assert model.peft_config["default"].r == next(iter(ranks))
    return next(iter(ranks))


def test_an_output_rank_change_republishes_every_member_at_the_new_rank(tmp_path,
                                                                          tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    first = run_round(fed)
    assert first["status"] == "completed" and first["settings_changed"] is None
    assert {_peft_rank(tiny_base, _published_folder(fed, c)) for c in CLIENTS} == {4}
    assert run_round(fed)["status"] == "nothing-new"
    commits = {c: publish_commits(fed, c) for c in CLIENTS}
    before = {c: peft_delta(tiny_base, _published_folder(fed, c)) for c in CLIENTS}

    set_strategy(fed, rank=2)
    record = run_round(fed)
    assert record["status"] == "completed" and record["round"] == 2
    # Nothing fresh: round 1 is replayed under the new settings, its inputs pinned as
    # its record lists them, each target merged onto what round 1 merged it onto.
    assert record["replay"] == {"round": 1,
                                "memory_revision": first["federation_revision"]}
    assert record["inputs"] == first["inputs"]
    assert record["latest"] == first["latest"] == dict.fromkeys(CLIENTS)
    assert record["weights"] == first["weights"]  # the same strategy otherwise
    assert sorted(record["outputs"]) == sorted(CLIENTS) and record["unchanged"] == {}
    assert record["settings_changed"]["changes"] == {"output_rank": [4, 2]}
    assert record["settings_changed"]["reason"] == "settings changed: output_rank 4 → 2"
    for client in CLIENTS:
        assert publish_commits(fed, client) == commits[client] + 1
        folder = _published_folder(fed, client)
        assert _peft_rank(tiny_base, folder) == 2
        after = peft_delta(tiny_base, folder)
        # Round 1's merge at rank 2: the best rank-2 approximation of the same sum,
        # i.e. of round 1's rank-4 ΔW (Eckart–Young truncations nest); the head as it was.
        for key, old in before[client].items():
            if key.startswith("score"):
                assert torch.allclose(after[key], old, atol=1e-6), key
                continue
            u, s, vh = torch.linalg.svd(old)
            best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            assert torch.allclose(after[key], best, atol=1e-5), key
            assert not torch.allclose(after[key], old, atol=1e-5), key
    state = fed.state()
    assert state.merge_settings["output_rank"] == 2
    assert state.merge_fingerprint == fingerprint(merge_settings(fed.config()))
    # The next idle round, same settings: nothing to do, nothing republished.
    assert run_round(fed)["status"] == "nothing-new"
    assert {c: publish_commits(fed, c) for c in CLIENTS} == {
        c: n + 1 for c, n in commits.items()}


def _tensors_of(fed) -> dict[str, dict[str, torch.Tensor]]:
    return {c: peft_delta(fed.config().base_model, _published_folder(fed, c)) for c in CLIENTS}


def test_a_rule_change_replays_the_last_round_under_the_new_rule(tmp_path, tiny_base):
    """No upload since round 1, then the strategy becomes uniform: round 2 redoes round
    1's merge with uniform weights, exactly what round 1 would have published under them."""
    fed = new_local_federation(tmp_path / "changed", tiny_base)
    first = run_round(fed)
    set_strategy(fed, method="uniform")
    record = run_round(fed)
    assert record["status"] == "completed" and record["replay"]["round"] == 1
    assert record["settings_changed"]["changes"]["method"] == ["fedbip-l", "uniform"]
    k = len(CLIENTS)
    assert record["weights"] == {"model": [[round(1 / k, 6)] * k] * k}  # the new rule
    assert record["weights"] != first["weights"]
    assert sorted(record["outputs"]) == sorted(CLIENTS)
    replayed = _tensors_of(fed)

    # The same members and uploads, uniform from the start.
    reference = new_local_federation(tmp_path / "reference", tiny_base, method="uniform")
    assert run_round(reference)["weights"] == record["weights"]
    expected = _tensors_of(reference)
    for client in CLIENTS:
        for key, delta in expected[client].items():
            assert torch.allclose(replayed[client][key], delta, atol=1e-6), (client, key)
    # Uniform weights give every member the same adapter; round 1's did not.
    assert all(torch.allclose(replayed["alice"][key], replayed["carol"][key], atol=1e-6)
               for key in replayed["alice"])
    # Nothing was consumed again: the state's uploads are round 1's, and the next
    # round with nothing new does nothing.
    state = fed.state()
    for client in CLIENTS:
        assert state.clients[client].consumed_upload == first["inputs"][client]["upload_id"]
        assert len(state.clients[client].personalized_history) == 2
    assert run_round(fed)["status"] == "nothing-new"


def test_a_self_share_change_reweighs_with_the_new_share(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    set_strategy(fed, rule="zscore", self_share=0.3)
    first = run_round(fed)
    before = _tensors_of(fed)
    set_strategy(fed, self_share=0.8)
    record = run_round(fed)
    assert record["settings_changed"]["changes"] == {"self_share": [0.3, 0.8]}
    after = _tensors_of(fed)
    shared = 0
    for key, matrix in record["weights"].items():
        for i, row in enumerate(matrix):
            old = first["weights"][key][i]
            assert sum(row) == pytest.approx(1.0, abs=1e-5)
            if old[i] == 1.0:  # no peer stood out: self only, whatever the share
                assert row[i] == 1.0, key
                continue
            shared += 1  # the same peers, the new self share
            assert old[i] == pytest.approx(0.3, abs=1e-6), key
            assert row[i] == pytest.approx(0.8, abs=1e-6), key
            assert [x > 0 for x in row] == [x > 0 for x in old]
    assert shared
    assert any(not torch.allclose(after[c][key], before[c][key], atol=1e-6)
               for c in CLIENTS for key in before[c])


def test_with_fresh_uploads_the_members_no_update_reaches_are_republished_too(tmp_path,
                                                                            tiny_base):
    """"local" shares nothing: before, only the member who pushed was republished and the
    others kept their rank-4 adapters under a rank-2 federation."""
    fed = new_local_federation(tmp_path, tiny_base, method="local")
    run_round(fed)
    before = _tensors_of(fed)
    pull_and_push(fed, tmp_path, "alice", seed=40, group=0)
    set_strategy(fed, rank=2)
    record = run_round(fed)
    assert record["replay"] is None  # news: an ordinary round under the new settings
    assert {c: p["fresh"] for c, p in record["inputs"].items()} == {
        "alice": True, "bob": False, "carol": False}
    assert sorted(record["outputs"]) == sorted(CLIENTS) and record["unchanged"] == {}
    after = _tensors_of(fed)
    for client in ("bob", "carol"):  # their own adapter, at the new rank
        assert _peft_rank(tiny_base, _published_folder(fed, client)) == 2
        for key, old in before[client].items():
            if key.startswith("score"):
                assert torch.allclose(after[client][key], old, atol=1e-6)
                continue
            u, s, vh = torch.linalg.svd(old)
            assert torch.allclose(after[client][key], u[:, :2] @ torch.diag(s[:2]) @ vh[:2],
                                  atol=1e-5), (client, key)
    assert _peft_rank(tiny_base, _published_folder(fed, "alice")) == 2
    assert run_round(fed)["status"] == "nothing-new"


IGNORED = {
    "lease_minutes": lambda fed: _edit_config(fed, lease_minutes=30.0),
    "limits": lambda fed: _edit_config(fed, limits=fed.config().limits.model_copy(
        update={"max_rank": 64, "max_adapter_mb": 100.0})),
    "allow_public_members": lambda fed: _edit_config(fed, allow_public_members=True),
    "a default spelled out": lambda fed: set_strategy(fed, self_share=0.3, top_k=None,
                                                      refactor="svd"),
    "lora.r under an explicit rank": lambda fed: (
        set_strategy(fed, rank=4),
        _edit_config(fed, lora=fed.config().lora.model_copy(update={"r": 16}))),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_settings_that_do_not_change_the_merge_trigger_nothing(case, tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    commits = {c: publish_commits(fed, c) for c in CLIENTS}
    IGNORED[case](fed)
    record = run_round(fed)
    assert record["status"] == "nothing-new", record
    assert {c: publish_commits(fed, c) for c in CLIENTS} == commits


def test_the_federations_lora_r_is_the_output_rank_when_the_strategy_sets_none(tmp_path,
                                                                             tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    _edit_config(fed, lora=fed.config().lora.model_copy(update={"r": 2}))
    record = run_round(fed)
    assert record["settings_changed"]["changes"] == {"output_rank": [4, 2]}
    assert {_peft_rank(tiny_base, _published_folder(fed, c)) for c in CLIENTS} == {2}


def test_the_settings_diff():
    config = FederationConfig(name="t", base_model="b", lora=LoraSpec(r=8))
    settings = merge_settings(config)
    assert settings["output_rank"] == 8 and "rank" not in settings
    assert set(settings) == set(Strategy.model_fields) - {"rank"} | {"output_rank"}
    assert changed_settings(None, settings) == {}  # nothing recorded yet
    assert changed_settings(settings, settings) == {}
    wider = merge_settings(config.model_copy(update={"strategy": {"rank": 16, "top_k": 2}}))
    assert changed_settings(settings, wider) == {"output_rank": [8, 16], "top_k": [None, 2]}
    assert (describe_changes(changed_settings(settings, wider))
            == "settings changed: output_rank 8 → 16, top_k null → 2")
    # A field one side lacks (added or removed by a fedbip version) is no change.
    assert changed_settings({**settings, "retired_option": 1}, settings) == {}
    assert changed_settings(settings, {**settings, "new_option": 1}) == {}
    # What `fedbip status` sees without validating (torch-free): the config's own options.
    assert stated_changes(config, settings) == {}
    spelled = config.model_copy(update={"strategy": {"self_share": 0.3, "rank": 8}})
    assert stated_changes(spelled, settings) == {}
    assert stated_changes(config.model_copy(update={"strategy": {"rank": 16, "top_k": 2}}),
                          settings) == changed_settings(settings, wider)
    # The fingerprint is of the canonical JSON: key order does not matter.
    assert fingerprint(dict(reversed(list(settings.items())))) == fingerprint(settings)
    assert fingerprint(wider) != fingerprint(settings)


@pytest.mark.parametrize("step", ["planned", "published:bob", "before-record"])
def test_a_remerge_stopped_at_any_step_resumes_and_still_remerges(step, tmp_path,
                                                                 tiny_base):
    """The settings are committed with the completed round only: a resumed re-merge still
    sees them changed and ends as the uninterrupted one does."""
    reference = new_local_federation(tmp_path / "clean", tiny_base)
    run_round(reference)
    set_strategy(reference, rank=2, self_share=0.5)
    run_round(reference)
    expected = _tensors_of(reference)

    fed = new_local_federation(tmp_path / "crashed", tiny_base)
    run_round(fed)
    set_strategy(fed, rank=2, self_share=0.5)
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at(step)).run()
    assert fed.state().merge_settings["output_rank"] == 4  # not committed yet
    record = run_round(fed, takeover=True)
    assert record["status"] == "completed" and record["round"] == 2
    assert record["replay"]["round"] == 1
    assert sorted(record["outputs"]) == sorted(CLIENTS)
    for client, tensors in _tensors_of(fed).items():
        assert publish_commits(fed, client) == 2  # one per plan, resumed or not
        for key, value in expected[client].items():
            assert torch.allclose(tensors[key], value, atol=1e-6), (client, key)
    assert fed.state().merge_settings["output_rank"] == 2
    assert run_round(fed)["status"] == "nothing-new"


def test_a_round_planned_before_the_change_applies_it_when_resumed(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base, method="local")
    run_round(fed)
    pull_and_push(fed, tmp_path, "alice", seed=41, group=0)
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at("planned")).run()
    set_strategy(fed, rank=2)  # while the round's lease is held
    record = run_round(fed, takeover=True)
    assert record["settings_changed"]["changes"] == {"output_rank": [4, 2]}
    assert sorted(record["outputs"]) == sorted(CLIENTS)
    assert {_peft_rank(tiny_base, _published_folder(fed, c)) for c in CLIENTS} == {2}


@pytest.mark.parametrize("k", [4, 12])
def test_over_the_hub_a_settings_change_costs_its_publishes(hub, tmp_path, tiny_base, k):
    """Idle rounds cost what they did (≤ 5 API calls, no commit) before and after the
    change; the re-merge round costs a round's fixed calls and ≤ 3 per republished
    member (its publish's preupload and commit, and the lease check before it)."""
    members = {f"m{i:02d}": i % 3 for i in range(k)}
    new_hub_federation(f"fedorg/settings{k}", tiny_base, tmp_path, members)
    fed = Federation.at(f"fedorg/settings{k}", cache_dir=tmp_path / "server-cache")
    assert run_round(fed)["status"] == "completed"

    def counted() -> tuple[dict, dict[str, int]]:
        since = len(hub.requests)
        record = run_round(fed)
        return record, hub.request_counts(since)

    record, idle = counted()
    assert record["status"] == "nothing-new" and idle["api"] <= 5 and idle["commits"] == 0
    set_strategy(fed, rank=2)
    record, counts = counted()
    republished = len(record["outputs"])
    assert republished == k and record["replay"]["round"] == 1
    assert counts["commits"] == 2 + republished  # the lease, each publish, the record
    # What the idle round costs (the heads), the lease commit (2), the publish stage's
    # heads listing (1), the record commit (3), and 3 per republished member.
    assert counts["api"] <= idle["api"] + 6 + 3 * republished, counts
    record, after = counted()
    assert record["status"] == "nothing-new" and after["api"] <= 5 and after["commits"] == 0


def test_status_says_a_change_is_pending_then_why_the_round_re_merged(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    assert federation_status(fed)["settings_pending"] is None
    set_strategy(fed, rank=2)
    why = "settings changed: output_rank 4 → 2"
    assert federation_status(fed)["settings_pending"] == why
    env = {"FEDBIP_CACHE": str(tmp_path / "cli-cache"), "OMP_NUM_THREADS": "1",
           "COLUMNS": "200"}
    shown = run_cli(["status", fed.address], env).stdout
    assert f"{why} since round 1: the next round re-merges every member" in shown
    run_round(fed)
    status = federation_status(fed)
    assert status["settings_pending"] is None
    assert status["last_round"]["settings_changed"] == why
    assert status["last_round"]["replay_of"] == 1
    shown = run_cli(["status", fed.address], env).stdout
    assert f"round 2 re-merged every member ({why}), replaying round 1's updates" in shown
    assert "next round re-merges" not in shown


def test_fedbip_strategy_commits_the_options_and_the_next_round_applies_them(tmp_path,
                                                                            tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    env = {"FEDBIP_CACHE": str(tmp_path / "cli-cache"), "OMP_NUM_THREADS": "1"}
    result = json_output(run_cli(["strategy", fed.address, "rank=2", "rule=zscore",
                                  "self_share=0.5", "--json"], env))
    assert result["settings_changed"] == {"output_rank": [4, 2], "rule": ["evidence", "zscore"],
                                          "self_share": [0.3, 0.5]}
    assert fed.config().strategy == {"method": "fedbip-l", "rank": 2, "rule": "zscore",
                                     "self_share": 0.5}
    record = run_round(fed)
    assert record["settings_changed"]["changes"] == result["settings_changed"]
    assert {_peft_rank(tiny_base, _published_folder(fed, c)) for c in CLIENTS} == {2}
    # The same options again: nothing to commit; null puts an option back to its default.
    head = fed.head()
    assert set_strategy_options(fed, {"rank": 2}).commit is None and fed.head() == head
    update = set_strategy_options(fed, {"self_share": None})
    assert update.changes == {"self_share": [0.5, 0.3]}
    assert "self_share" not in fed.config().strategy


@pytest.mark.parametrize(("options", "message"), [
    (["self_shar=0.5"], "self_share"),  # a near match is named
    (["self_share=2"], "self_share"),
    (["method=oracle"], "groups"),
    (["rank"], "key=value"),
])
def test_fedbip_strategy_refuses_bad_options_and_commits_nothing(options, message, tmp_path,
                                                                 tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    head = fed.head()
    env = {"FEDBIP_CACHE": str(tmp_path / "cli-cache"), "OMP_NUM_THREADS": "1"}
    result = run_cli(["strategy", fed.address, *options, "--json"], env, check=False)
    assert result.returncode != 0
    error = json.loads(result.stdout)
    assert error["error"] == "ConfigError" and message in error["message"] + error["hint"]
    assert fed.head() == head


def test_a_replay_whose_record_does_not_read_stops_before_its_lease(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    fed.store.commit(fed.repo_id, {"rounds/000001.json": b"{not json"},
                     message="test: break the record")
    set_strategy(fed, rank=2)
    head = fed.head()
    with pytest.raises(ConfigError, match=r"rounds/000001\.json"):
        run_round(fed)
    assert fed.head() == head and fed.state().in_progress is None


def test_a_remerge_whose_only_fresh_upload_is_refused_still_republishes(tmp_path,
                                                                       tiny_base):
    """The round planned on alice's fresh upload, under a rank change; the gate refuses
    it (NaN) and her last consumed one stands in: nothing fresh is left, and every member
    is still re-merged from its latest adapter at the new rank."""
    fed = new_local_federation(tmp_path, tiny_base, method="local")
    run_round(fed)
    before = _tensors_of(fed)
    repo = fed.member("alice").repo_id
    head = fed.store.head(repo)
    folder = fed.store.fetch_folder(repo, head)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[next(k for k in tensors if "lora_B" in k)][0, 0] = float("nan")
    save_file(tensors, tmp_path / "poisoned.safetensors", metadata={"format": "pt"})
    metadata = json.loads((folder / UPLOAD_METADATA_NAME).read_text())
    metadata["upload_nonce"] = "poisoned"
    fed.store.commit(repo, {"adapter_model.safetensors": tmp_path / "poisoned.safetensors",
                            UPLOAD_METADATA_NAME: json.dumps(metadata).encode()},
                     message="test: past the client gate", parent=head)
    set_strategy(fed, rank=2)
    record = run_round(fed)
    assert record["replay"] is None and "NaN" in record["skipped"]["alice"]
    assert not any(p["fresh"] for p in record["inputs"].values())
    assert sorted(record["outputs"]) == sorted(CLIENTS)
    after = _tensors_of(fed)
    for client in CLIENTS:
        assert _peft_rank(tiny_base, _published_folder(fed, client)) == 2
        for key, old in before[client].items():
            if not key.startswith("score"):
                u, s, vh = torch.linalg.svd(old)
                old = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            assert torch.allclose(after[client][key], old, atol=1e-5), (client, key)
    assert run_round(fed)["status"] == "nothing-new"


def test_replays_chain_onto_what_the_replayed_round_merged_onto(tmp_path, tiny_base):
    """Round 2 (alice's second upload) is replayed twice under two successive changes:
    the end state is round 2 run under the final settings, as in a federation that
    changed them before round 2, whose round 2 re-merges (rank, weights) with news."""
    def federation(root):
        fed = new_local_federation(root, tiny_base)
        run_round(fed)
        return fed

    fed = federation(tmp_path / "a")
    pull_and_push(fed, tmp_path / "a", "alice", seed=40, group=0)
    second = run_round(fed)
    set_strategy(fed, rank=2, rule="softmax")
    third = run_round(fed)
    assert third["replay"] == {"round": 2, "memory_revision": second["federation_revision"]}
    assert third["latest"] == second["latest"]
    assert third["inputs"] == second["inputs"]
    set_strategy(fed, temperature=0.5)
    fourth = run_round(fed)
    assert fourth["settings_changed"]["changes"] == {"temperature": [0.1, 0.5]}
    assert fourth["replay"] == third["replay"] and fourth["latest"] == second["latest"]
    assert sorted(fourth["outputs"]) == sorted(CLIENTS)

    reference = federation(tmp_path / "b")
    set_strategy(reference, rank=2, rule="softmax", temperature=0.5)
    pull_and_push(reference, tmp_path / "b", "alice", seed=40, group=0)
    expected = run_round(reference)
    assert expected["replay"] is None and sorted(expected["outputs"]) == sorted(CLIENTS)
    assert fourth["weights"] == expected["weights"]
    assert fourth["weights"] != second["weights"]
    replayed, wanted = _tensors_of(fed), _tensors_of(reference)
    for client in CLIENTS:
        assert _peft_rank(tiny_base, _published_folder(fed, client)) == 2
        for key, delta in wanted[client].items():
            assert torch.allclose(replayed[client][key], delta, atol=1e-6), (client, key)
    # alice's round-2 upload was consumed once: her state still names it.
    assert (fed.state().clients["alice"].consumed_upload
            == second["inputs"]["alice"]["upload_id"])
