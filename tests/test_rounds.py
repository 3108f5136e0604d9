"""Server rounds in-process: concurrency, skipped members, refusals, crash and resume,
dry runs and the model card (the CLI path is covered by test_federation_e2e.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from federation_helpers import CLIENTS, new_local_federation, push_fresh, write_upload
from safetensors.torch import load_file, save_file

from fedbip_hub.errors import NotFoundError, RoundInProgressError
from fedbip_hub.federation.client import (
    init_federation,
    join,
    pull,
    push,
    upload_id,
)
from fedbip_hub.federation.config import FederationConfig, LoraSpec, Member, dump_json
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner, run_round


def _heads(fed: Federation) -> dict[str, str]:
    repos = [fed.repo_id] + [m.repo_id for m in fed.members().values()]
    return {r: fed.store.head(r) for r in repos}


def test_a_push_during_a_round_is_neither_lost_nor_consumed_twice(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    pushed = {}

    def push_while_publishing(items, description):
        if description == "Publishing":  # inputs are pinned; alice pushes again now
            pushed["commit"] = push_fresh(fed, tmp_path, "alice", seed=50, group=0)
        return items

    first = RoundRunner(fed, progress=push_while_publishing).run()
    assert first["inputs"]["alice"]["commit"] != pushed["commit"]
    state = fed.state()
    assert state.clients["alice"].consumed_commit == first["inputs"]["alice"]["commit"]

    second = run_round(fed)
    assert second["round"] == 2
    assert {c: v["fresh"] for c, v in second["inputs"].items()} == {
        "alice": True, "bob": False, "carol": False}
    repo = fed.member("alice").repo_id
    pushed_id = upload_id(fed.store.read_bytes(repo, "fedbip_upload.json", pushed["commit"]))
    assert second["inputs"]["alice"]["upload_id"] == pushed_id
    assert run_round(fed)["status"] == "nothing-new"
    assert len(fed.state().clients["alice"].personalized_history) == 2


def test_missing_member_repo_is_skipped_with_a_reason_and_others_proceed(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    shutil.rmtree(tmp_path / "fed" / "repos" / "clients" / "carol")
    record = run_round(fed)
    assert sorted(record["outputs"]) == ["alice", "bob"]
    assert "does not exist" in record["skipped"]["carol"]
    assert "fix:" in record["skipped"]["carol"]


def test_a_refused_upload_is_recorded_and_not_retried(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    repo = fed.member("bob").repo_id
    head = fed.store.head(repo)
    folder = fed.store.fetch_folder(repo, head)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(tensors, poisoned, metadata={"format": "pt"})
    metadata = json.loads((folder / "fedbip_upload.json").read_text())
    metadata["upload_nonce"] = "poisoned"
    fed.store.commit(repo, {"adapter_model.safetensors": poisoned,
                            "fedbip_upload.json": json.dumps(metadata).encode()},
                     message="bypass the client-side gate", parent=head)
    record = run_round(fed)
    assert "NaN" in record["skipped"]["bob"]
    assert sorted(record["outputs"]) == ["alice", "carol"]
    assert run_round(fed)["status"] == "nothing-new"


def test_dry_run_writes_nothing(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    before = _heads(fed)
    record = run_round(fed, dry_run=True)
    assert record["status"] == "dry-run"
    assert record["weights"] and record["cosine"]["model"]
    assert _heads(fed) == before


def test_personalized_model_card(tmp_path, tiny_base):
    from huggingface_hub import ModelCard

    fed = new_local_federation(tmp_path, tiny_base)
    run_round(fed)
    out = pull(fed, "alice", tmp_path / "pulled")
    card = ModelCard.load(out.folder / "README.md")
    # a local base is no Hub id: kept out of the metadata (the Hub refuses it), in the text
    assert card.data.base_model is None and f"Base model: `{tiny_base}`" in card.text
    assert card.data.library_name == "peft"
    assert "fedbip" in card.data.tags
    for client in CLIENTS:
        assert f"| {client}" in card.text
    assert "![Task-vector cosine similarity](similarity.png)" in card.text
    assert (out.folder / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_job_during_a_round_exits_cleanly(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    errors = []

    def start_a_second_job(items, description):
        if description == "Publishing":
            with pytest.raises(RoundInProgressError) as info:
                run_round(fed)
            errors.append(str(info.value))
        return items

    record = RoundRunner(fed, progress=start_a_second_job).run()
    assert record["status"] == "completed"
    assert "in progress" in errors[0] and "--takeover" in errors[0]


def test_unknown_federation_is_refused_clearly(tmp_path):
    with pytest.raises(NotFoundError) as info:
        Federation.at(str(tmp_path / "nowhere")).config()
    assert "no federation at" in str(info.value)
    assert "fedbip init" in info.value.hint


def test_forbidden_member_repo_on_the_hub_is_skipped(hub, tmp_path, tiny_base):
    fed = _federation_on_hub(tiny_base)
    hub.add_token("hf_other_user_token_123", "someone")
    hub.create_repo("someone/secret", private=True)
    fed.store.commit(fed.repo_id, {"members/mallory.json": dump_json(
        Member(name="mallory", repo_id="someone/secret"))}, message="add mallory")
    record = run_round(fed)
    assert "mallory" in record["skipped"]
    assert "token" in record["skipped"]["mallory"]
    assert sorted(record["outputs"]) == sorted(CLIENTS)


def _federation_on_hub(tiny_base: Path) -> Federation:
    config = FederationConfig(name="h", base_model=str(tiny_base), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8), strategy={"method": "fedbip"})
    fed = init_federation("fedorg/rounds", config)
    for i, (client, group) in enumerate(CLIENTS.items()):
        join(fed, client)
        upload = write_upload(fed.init_folder(), Path(fed.store.cache_dir) / f"up-{client}",
                              seed=i, group=group, rank=4)
        push(fed, client, upload, n_examples=5)
    return fed


def test_a_large_federations_card_lists_only_contributors(tmp_path, tiny_base, monkeypatch):
    import fedbip_hub.federation.modelcard as modelcard

    monkeypatch.setattr(modelcard, "MAX_CARD_ROWS", 2)  # 3 members count as "large" here
    fed = new_local_federation(tmp_path, tiny_base)
    record = run_round(fed)
    alice = record["clients"].index("alice")
    weights = record["weights"]
    hidden = [c for k, c in enumerate(record["clients"]) if k != alice
              and all(m[alice][k] == 0 for m in weights.values())]
    assert hidden, "the test needs a member with no weight for alice"
    text = pull(fed, "alice", tmp_path / "pulled").folder.joinpath("README.md").read_text()
    assert "| alice (you)" in text and "| bob" in text
    for client in hidden:
        assert f"| {client}" not in text
    assert f"… {len(hidden)} more members with weight 0" in text
