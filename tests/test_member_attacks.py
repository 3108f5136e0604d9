"""Attacks by one member on everyone: poison pills, silent shutdown, stalls, denial of
service, steering and identity theft (issue 12).

Each attack is made the way a hostile member would: committed straight into its own repo
or into the federation repo (bypassing ``fedbip push``), or through ``fedbip join``. Each
must be refused or neutralised with a reason, and the honest members' published adapters
must be bitwise those of the same federation without the attacker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    Crash,
    crash_at,
    new_local_federation,
    published_outputs,
    push_fresh,
    set_strategy,
    write_upload,
)
from safetensors.torch import load_file, save

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.lora import WEIGHTS_NAME
from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.engine.memory import MEMORY_FILE, SimilarityMemory
from fedbip_hub.errors import AdapterError, ConfigError
from fedbip_hub.federation.client import join, push, upload_id
from fedbip_hub.federation.config import FEDERATION_FILE, MEMBERS_DIR, STATE_FILE, Member, dump_json
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.status import federation_status
from fedbip_hub.server.rounds import RoundRunner, run_round

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
LONG_NAME = "m" * 240
HOSTILE_KEY = "(.|.)*Z"


def _upload_files(fed: Federation, root: Path, name: str, *, config: dict | None = None,
                  tensors: dict | None = None, meta: dict | bytes | None = None
                  ) -> dict[str, bytes]:
    """A first-round upload for ``name`` (valid unless changed), as files to commit."""
    good = write_upload(fed.init_folder(), root / f"attack-{name}", seed=50, group=0, rank=4)
    cfg = json.loads((good / CONFIG_NAME).read_text()) | (config or {})
    weights = load_file(good / WEIGHTS_NAME) if tensors is None else tensors
    if not isinstance(meta, bytes):
        meta = json.dumps({"n_examples": 10, "base_model": fed.config().base_model,
                           "upload_nonce": name} | (meta or {})).encode()
    return {CONFIG_NAME: json.dumps(cfg).encode(), WEIGHTS_NAME: save(weights),
            UPLOAD_METADATA_NAME: meta}


def _bypass(fed: Federation, name: str, files: dict[str, bytes]) -> str:
    """``name`` joins, then commits ``files`` straight into its repo (no client-side gate)."""
    repo = join(fed, name).repo_id
    return fed.store.commit(repo, files, message="bypass the client-side gate")


def _filled_b(fed: Federation, root: Path, value: float) -> dict[str, torch.Tensor]:
    good = write_upload(fed.init_folder(), root / "filled", seed=51, group=0, rank=4)
    tensors = load_file(good / WEIGHTS_NAME)
    return {k: torch.full_like(v, value) if ".lora_B." in k else v for k, v in tensors.items()}


def _nested(depth: int) -> bytes:
    return b'{"n_examples": 5, "x": ' + b"[" * depth + b"]" * depth + b"}"


def _assert_bitwise(fed: Federation, honest: dict[str, dict[str, torch.Tensor]]) -> None:
    for client, tensors in published_outputs(fed, list(honest)).items():
        assert tensors.keys() == honest[client].keys()
        for key, value in honest[client].items():
            assert torch.equal(tensors[key], value), (client, key)


# -- one federation, every upload-level and membership attack at once -----------------------
@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("honest"), tiny_base)
    record = run_round(fed)
    assert sorted(record["outputs"]) == sorted(CLIENTS)
    return published_outputs(fed)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    root = tmp_path_factory.mktemp("attacked")
    fed = new_local_federation(root, tiny_base)
    uploads = {
        "alpha-1e300": _upload_files(fed, root, "a1", config={"lora_alpha": 1e300}),
        "alpha-pattern-1e300": _upload_files(
            fed, root, "a2", config={"alpha_pattern": {"q_proj": 1e300}}),
        "alpha-1e36": _upload_files(fed, root, "a3", config={"lora_alpha": 1e36}),
        "alpha-1e6": _upload_files(fed, root, "a4", config={"lora_alpha": 1e6}),
        "b-3e38": _upload_files(fed, root, "b", tensors=_filled_b(fed, root, 3e38)),
        "b-1e12": _upload_files(fed, root, "b2", tensors=_filled_b(fed, root, 1e12)),
        "regex-stall": _upload_files(fed, root, "re", config={"rank_pattern": {HOSTILE_KEY: 4}}),
        "nested-json": _upload_files(fed, root, "nj", meta=_nested(10_000)),
        "n-examples-1e400": _upload_files(fed, root, "n", meta=b'{"n_examples": 1' +
                                          b"0" * 400 + b"}"),
    }
    commits = {name: _bypass(fed, name, files) for name, files in uploads.items()}
    # Membership attacks, straight into the federation repo.
    bob = fed.member("bob")
    fed.store.commit(fed.repo_id, {
        f"{MEMBERS_DIR}/{LONG_NAME}.json": dump_json(Member(name="x", repo_id="clients/x")),
        f"{MEMBERS_DIR}/list.json": b"[]",
        f"{MEMBERS_DIR}/deep.json": _nested(10_000),
        f"{MEMBERS_DIR}/thief.json": dump_json(Member(name="thief", repo_id=bob.repo_id)),
        f"{MEMBERS_DIR}/fed.json": dump_json(Member(name="fed", repo_id=fed.repo_id)),
        f"{MEMBERS_DIR}/mallory.json": dump_json(Member(name="bob", repo_id="clients/evil")),
    }, message="hostile member files")
    # Junk where the server reads its own publish record back.
    fed.store.commit(fed.member("carol").repo_id, {"personalized/fedbip_merge.json": b"[]"},
                     message="junk in personalized/")
    started = time.perf_counter()
    first = run_round(fed)
    seconds = time.perf_counter() - started
    second = run_round(fed)
    return fed, uploads, commits, first, second, seconds


def test_honest_members_are_personalized_bitwise_as_without_the_attackers(attacked, honest):
    fed, _uploads, _commits, first, _second, _seconds = attacked
    assert first["status"] == "completed"
    assert sorted(first["clients"]) == sorted(CLIENTS)
    assert sorted(first["outputs"]) == sorted(CLIENTS)
    _assert_bitwise(fed, honest)
    for tensors in honest.values():
        assert all(bool(torch.isfinite(v).all()) for v in tensors.values())


@pytest.mark.parametrize(("name", "phrase"), [
    ("alpha-1e300", "an alpha must be positive and at most 1e+30"),
    ("alpha-pattern-1e300", "malformed alpha_pattern"),
    ("alpha-1e36", "an alpha must be positive and at most 1e+30"),
    ("alpha-1e6", "over the federation's limit of 10000"),
    ("b-3e38", "limits.max_factor_norm"),
    ("b-1e12", "limits.max_factor_norm"),
])
def test_poison_pills_and_silent_shutdown_are_refused(attacked, name, phrase):
    fed, _uploads, commits, first, second, _seconds = attacked
    why = first["skipped"][name]
    assert phrase in why and "(fix: " in why, why
    assert name not in first["inputs"]
    # refused for good: not retried, never consumed, never personalized
    assert second["status"] == "nothing-new"
    client = fed.state().clients[name]
    repo = fed.member(name).repo_id
    assert client.refused_upload == upload_id(
        fed.store.read_bytes(repo, UPLOAD_METADATA_NAME, commits[name]))
    assert client.consumed_upload is None and not client.personalized_history


def test_a_backtracking_pattern_key_is_refused_at_once(attacked):
    _fed, _uploads, _commits, first, _second, seconds = attacked
    why = first["skipped"]["regex-stall"]
    assert "malformed rank_pattern" in why and HOSTILE_KEY in why and "plain module name" in why
    assert seconds < 30  # the whole round; the key alone hung the server > 150 s before


def test_deeply_nested_upload_metadata_is_refused_every_run(attacked):
    _fed, _uploads, _commits, first, second, _seconds = attacked
    for record in (first, second):
        assert "nested deeper than 32 levels" in record["skipped"]["nested-json"]


def test_an_integer_of_400_digits_is_refused_before_any_float(attacked):
    _fed, _uploads, _commits, first, _second, _seconds = attacked
    assert "an integer has 401 digits" in first["skipped"]["n-examples-1e400"]


def test_bad_member_files_are_left_out_with_a_reason(attacked):
    fed, _uploads, _commits, first, _second, _seconds = attacked
    skipped = first["skipped"]
    long_key = next(k for k in skipped if k.startswith(f"{MEMBERS_DIR}/mmmm"))
    assert "is 240 characters long" in skipped[long_key]
    assert "not a valid member file" in skipped[f"{MEMBERS_DIR}/list.json"]
    assert "nested deeper" in skipped[f"{MEMBERS_DIR}/deep.json"]
    assert "names member 'bob', not 'mallory'" in skipped[f"{MEMBERS_DIR}/mallory.json"]
    members = fed.members()
    assert sorted(members) == sorted([*CLIENTS, *attacked[1]])
    assert members["bob"].repo_id == "clients/bob"
    # status reads the same federation without a traceback, and says what it left out
    status = federation_status(fed)
    assert sorted(m["name"] for m in status["members"]) == sorted(members)
    assert f"{MEMBERS_DIR}/list.json" in status["member_problems"]


def test_a_second_claim_on_a_repo_is_left_out_and_the_first_joiner_keeps_it(attacked):
    _fed, _uploads, _commits, first, _second, _seconds = attacked
    why = first["skipped"][f"{MEMBERS_DIR}/thief.json"]
    assert "which member bob joined with first" in why
    assert "the federation's own repo" in first["skipped"][f"{MEMBERS_DIR}/fed.json"]
    assert "thief" not in first["inputs"] and "fed" not in first["inputs"]
    assert first["inputs"]["bob"]["repo_id"] == "clients/bob"


def test_junk_in_a_members_personalized_folder_does_not_stop_the_round(attacked):
    _fed, _uploads, _commits, first, _second, _seconds = attacked
    assert "carol" in first["outputs"] and not first["outputs"]["carol"].get("resumed")


# -- fedbip join and fedbip push enforce the same bounds ----------------------------------
def test_join_refuses_bad_names_and_someone_elses_repo(attacked):
    fed, *_ = attacked
    with pytest.raises(ConfigError, match="is 240 characters long"):
        join(fed, LONG_NAME)
    with pytest.raises(ConfigError, match="invalid client name"):
        join(fed, "../etc")
    with pytest.raises(ConfigError, match="is already member bob's"):
        join(fed, "mallory", repo_id=fed.member("bob").repo_id)
    with pytest.raises(ConfigError, match="the federation's own repo"):
        join(fed, "mallory", repo_id=fed.repo_id)
    with pytest.raises(ConfigError, match="invalid repo id"):
        join(fed, "mallory", repo_id="a" * 200)
    assert "mallory" not in fed.members()


@pytest.mark.parametrize(("name", "phrase"), [
    ("alpha-1e300", "an alpha must be positive"), ("alpha-1e6", "LoRA scaling"),
    ("b-3e38", "limits.max_factor_norm"), ("regex-stall", "malformed rank_pattern"),
])
def test_push_refuses_what_the_server_refuses(attacked, tmp_path, name, phrase):
    fed, uploads, _commits, first, _second, _seconds = attacked
    folder = tmp_path / name
    folder.mkdir()
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        (folder / file).write_bytes(uploads[name][file])
    head = fed.store.head(fed.member(name).repo_id)
    with pytest.raises(AdapterError) as info:
        push(fed, name, folder, n_examples=10)
    assert phrase in info.value.message and info.value.client == name
    assert info.value.message.rsplit("/", 1)[-1] in first["skipped"][name]  # same words
    assert fed.store.head(fed.member(name).repo_id) == head


def test_push_refuses_n_examples_over_the_limit(attacked, tmp_path):
    fed, *_ = attacked
    folder = write_upload(fed.init_folder(), tmp_path / "up", seed=3, group=0, rank=4)
    with pytest.raises(AdapterError, match="over the federation's limit of 1000000000"):
        push(fed, "alice", folder, n_examples=10**10)


# -- steering FedAvg with n_examples -------------------------------------------------------
def _fedavg(root: Path, base: Path, *, attacker_n: int | None, share: float | None = None):
    fed = new_local_federation(root, base, push_all=False, method="fedavg")
    if share is not None:
        set_strategy(fed, max_size_share=share)
    for i, (client, group) in enumerate(CLIENTS.items()):
        push_fresh(fed, root, client, seed=i, group=group)
    if attacker_n is not None:
        _bypass(fed, "steer", _upload_files(fed, root, "steer", meta=json.dumps(
            {"n_examples": attacker_n, "base_model": fed.config().base_model}).encode()))
    return fed, run_round(fed)


def test_n_examples_over_the_limit_cannot_steer_fedavg(tmp_path, tiny_base):
    honest_fed, _ = _fedavg(tmp_path / "honest", tiny_base, attacker_n=None)
    fed, record = _fedavg(tmp_path / "attacked", tiny_base, attacker_n=10**30)
    assert "an integer has 31 digits" in record["skipped"]["steer"]
    _assert_bitwise(fed, published_outputs(honest_fed))
    fed, record = _fedavg(tmp_path / "at-limit", tiny_base, attacker_n=10**9 + 1)
    assert "over the federation's limit of 1000000000" in record["skipped"]["steer"]
    _assert_bitwise(fed, published_outputs(honest_fed))


def test_max_size_share_caps_a_large_client(tmp_path, tiny_base):
    _fed, record = _fedavg(tmp_path / "capped", tiny_base, attacker_n=10**9, share=0.4)
    names = record["clients"]
    weights = torch.tensor(record["weights"]["model"])
    steer = names.index("steer")
    assert torch.allclose(weights[:, steer], torch.full((len(names),), 0.4), atol=1e-6)
    assert torch.allclose(weights.sum(dim=1), torch.ones(len(names)), atol=1e-6)


# -- a poison pill that passes the gate (limits loosened) is dropped from the plan ----------
def _loosen(fed: Federation) -> None:
    config = fed.config()
    config.limits = config.limits.model_copy(update={
        "max_scaling": 1e300, "max_factor_norm": 1e300, "max_task_vector_norm": 1e300})
    fed.store.commit(fed.repo_id, {FEDERATION_FILE: dump_json(config)}, message="loosen")


def test_an_input_that_breaks_the_maths_is_dropped_and_never_replayed(tmp_path, tiny_base,
                                                                       honest):
    fed = new_local_federation(tmp_path, tiny_base)
    _loosen(fed)
    _bypass(fed, "pill", _upload_files(fed, tmp_path, "pill",
                                       tensors=_filled_b(fed, tmp_path, 3e38)))
    with pytest.raises(Crash):
        RoundRunner(fed, checkpoint=crash_at("computed")).run()
    lease = fed.state().in_progress
    assert "pill" in lease["dropped"] and "pill" not in lease["inputs"]
    assert "dropped from this round's plan" in lease["skipped"]["pill"]
    heads = [c.title for c in fed.store.history(fed.repo_id)]
    assert heads[0] == "fedbip: round 1: dropped pill"
    record = RoundRunner(fed, takeover=True).run()  # the resume never reads the pill
    assert record["status"] == "completed" and record["dropped_from_plan"] == ["pill"]
    assert "pill" not in record["inputs"] and "dropped" in record["skipped"]["pill"]
    assert fed.state().clients["pill"].refused_upload is not None
    _assert_bitwise(fed, honest)


# -- a consumed update that breaks the maths leaves the pool --------------------------------
def test_a_consumed_poisoned_update_leaves_the_pool(tmp_path, tiny_base):
    def second_round(fed: Federation, root: Path) -> dict:
        for i, (client, group) in enumerate(CLIENTS.items()):
            start = root / f"start-{client}"
            from fedbip_hub.federation.client import pull

            pull(fed, client, start)
            push_fresh(fed, root, client, seed=10 + i, group=group, start=start)
        return run_round(fed)

    honest_fed = new_local_federation(tmp_path / "honest", tiny_base)
    run_round(honest_fed)
    second_round(honest_fed, tmp_path / "honest")

    root = tmp_path / "attacked"
    fed = new_local_federation(root, tiny_base)
    commit = _bypass(fed, "mallory", _upload_files(fed, root, "m", config={"lora_alpha": 1e36}))
    run_round(fed)
    # As a server before the bounds would have left it: consumed, and NaN in the memory.
    state = fed.state()
    repo = fed.member("mallory").repo_id
    mallory = state.clients["mallory"]
    mallory.consumed_upload, mallory.refused_upload = mallory.refused_upload, None
    mallory.consumed_commit = commit
    memory = SimilarityMemory.from_bytes(fed.store.read_bytes(fed.repo_id, MEMORY_FILE,
                                                              fed.head()), granularity="layer")
    k = len(memory.clients)
    poisoned = SimilarityMemory([*memory.clients, "mallory"], memory.granularity)
    for key in memory.cross:
        for source, target in ((memory.cross, poisoned.cross), (memory.own, poisoned.own)):
            grown = torch.full((k + 1, k + 1), float("nan"), dtype=torch.float64)
            grown[:k, :k] = source[key]
            target[key] = grown
    fed.store.commit(fed.repo_id, {STATE_FILE: dump_json(state),
                                   MEMORY_FILE: poisoned.to_bytes()}, message="pre-bounds")
    assert fed.store.read_bytes(repo, UPLOAD_METADATA_NAME, commit)

    record = second_round(fed, root)
    assert record["status"] == "completed"
    assert "left the pool" in record["skipped"]["mallory"] and "mallory" in record["evicted"]
    assert "mallory" not in record["clients"]
    assert fed.state().clients["mallory"].consumed_commit is None
    after = SimilarityMemory.from_bytes(fed.store.read_bytes(fed.repo_id, MEMORY_FILE,
                                                             fed.head()), granularity="layer")
    assert "mallory" not in after.clients and not after.nonfinite_clients()
    _assert_bitwise(fed, published_outputs(honest_fed))
    assert run_round(fed)["status"] == "nothing-new"  # and it never comes back


# -- the same on the Hub: one long member name never breaks everyone's members() -----------
def test_a_long_member_file_name_on_the_hub_breaks_no_one(hub, tmp_path, tiny_base):
    from fedbip_hub.federation.client import init_federation
    from fedbip_hub.federation.config import FederationConfig, LoraSpec

    config = FederationConfig(name="t", base_model=str(tiny_base), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8))
    fed = init_federation("fedorg/attack", config)
    fed = Federation.at("fedorg/attack", cache_dir=tmp_path / "cache")
    join(fed, "alice")
    with pytest.raises(ConfigError, match="is 240 characters long"):
        join(fed, LONG_NAME)
    fed.store.commit(fed.repo_id, {
        f"{MEMBERS_DIR}/{LONG_NAME}.json": dump_json(Member(name="x", repo_id="fedorg/x")),
        f"{MEMBERS_DIR}/list.json": b"[]"}, message="hostile member files")
    assert list(fed.members()) == ["alice"]
    push_fresh(fed, tmp_path, "alice", seed=0, group=0)
    record = run_round(fed)
    assert record["status"] == "completed" and list(record["outputs"]) == ["alice"]
    assert any("240 characters" in why for why in record["skipped"].values())
    assert federation_status(fed)["members"][0]["name"] == "alice"
