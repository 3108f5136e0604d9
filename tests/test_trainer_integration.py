"""Bring your own trainer (issue 14 item 2): a plain transformers ``Trainer`` started from
the member's right adapter, pushed by ``FedbipPushCallback`` with the right metadata, from
the initial adapter and from a personalized one; and the by-hand path for any trainer,
``fedbip pull --or-init`` → ``PeftModel.from_pretrained(..., is_trainable=True)`` →
``fedbip push``."""

from __future__ import annotations

import json

import torch
from federation_helpers import json_output, run_cli, write_upload
from safetensors.torch import load_file

from fedbip_hub.federation.client import init_federation, join, latest_personalized_revision, push
from fedbip_hub.federation.config import FederationConfig, LoraSpec
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import run_round
from fedbip_hub.training.integration import FedbipPushCallback, load_trainable, prepare_start

WEIGHTS = "adapter_model.safetensors"


def _dataset(n: int = 12, length: int = 6):
    """Pre-tokenized, fixed-length examples (the tiny base has no tokenizer)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 60, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": [i % 3 for i in range(n)]})


def _train(model, dataset, callback, tmp_path):
    from transformers import Trainer, TrainingArguments

    Trainer(model=model, train_dataset=dataset, callbacks=[callback],
            args=TrainingArguments(output_dir=str(tmp_path / "scratch"), max_steps=2,
                                   per_device_train_batch_size=4, learning_rate=1e-2,
                                   save_strategy="no", report_to=[], use_cpu=True)).train()
    return callback.result


def _fed(tmp_path, tiny_base) -> Federation:
    config = FederationConfig(name="byo", base_model=str(tiny_base), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8))
    fed = init_federation(str(tmp_path / "fed"), config)
    for client in ("alice", "bob"):
        join(fed, client)
    return fed


def _uploaded(fed: Federation, client: str) -> tuple[dict, dict]:
    repo = fed.member(client).repo_id
    head = fed.store.head(repo)
    metadata = json.loads(fed.store.read_bytes(repo, "fedbip_upload.json", head))
    tensors = load_file(fed.store.fetch_folder(repo, head, "") / WEIGHTS)
    return metadata, tensors


def test_the_callback_pushes_from_the_init_then_from_the_personalized_adapter(tmp_path,
                                                                              tiny_base):
    fed = _fed(tmp_path, tiny_base)
    dataset = _dataset()
    # round 0: no personalized adapter yet, so training starts from the initial adapter
    start = prepare_start(fed, "alice", tmp_path / "alice")
    assert start.revision is None
    model = load_trainable(fed, start)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
        n for n, _ in model.named_parameters() if "lora_A" in n}
    result = _train(model, dataset, FedbipPushCallback(fed, start), tmp_path)
    metadata, pushed = _uploaded(fed, "alice")
    assert metadata.get("start_revision") is None and metadata["n_examples"] == len(dataset)
    assert result.metadata.n_examples == len(dataset)  # from the train dataloader
    init = load_file(fed.init_folder() / WEIGHTS)
    saved = load_file(start.folder / WEIGHTS)
    assert pushed.keys() == init.keys() == saved.keys()
    assert all(torch.equal(pushed[k], saved[k]) for k in pushed)  # what was trained
    assert any(not torch.equal(pushed[k], init[k]) for k in pushed)  # and it moved

    push(fed, "bob", write_upload(fed.init_folder(), tmp_path / "bob", seed=1, group=0, rank=4),
         n_examples=5)
    first = run_round(fed)
    assert first["inputs"]["alice"]["fresh"] and "alice" in first["outputs"]

    # round 1: training starts from alice's personalized adapter, and says so
    personalized = latest_personalized_revision(fed, fed.member("alice").repo_id)
    start = prepare_start(fed, "alice", tmp_path / "alice")
    assert start.revision == personalized
    loaded = load_trainable(fed, start)
    published = load_file(fed.store.fetch_folder(fed.member("alice").repo_id, personalized,
                                                 "personalized") / WEIGHTS)
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items()}
    lora = [k for k in published if ".lora_" in k]
    assert lora and all(torch.equal(state[k], published[k]) for k in lora)  # it loaded that
    _train(loaded, dataset, FedbipPushCallback(fed, start, n_examples=7, task="t"), tmp_path)
    metadata, _ = _uploaded(fed, "alice")
    assert (metadata.get("start_revision"), metadata["n_examples"], metadata.get("task")) == (
        personalized, 7, "t")
    second = run_round(fed)
    assert second["inputs"]["alice"]["fresh"] and second["inputs"]["alice"]["staleness"] == 0


def test_any_trainer_by_hand_pull_or_init_then_push_records_the_start(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    fed = _fed(tmp_path, tiny_base)
    address, folder = str(tmp_path / "fed"), tmp_path / "mine"
    refused = run_cli(["pull", address, "--client", "alice", "--out", str(folder), "--json"],
                      {}, check=False)
    assert refused.returncode != 0 and "--or-init" in json.loads(refused.stdout)["hint"]
    pulled = json_output(run_cli(["pull", address, "--client", "alice", "--out", str(folder),
                                  "--or-init", "--json"], {}))
    assert pulled["revision"] is None
    assert json.loads((folder / "fedbip_start.json").read_text())["start_revision"] is None

    # "your own trainer": load trainable, change the weights, save into the same folder
    base = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    with torch.no_grad():
        for p in trainable:
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    pushed = json_output(run_cli(["push", address, "--client", "alice", "--adapter",
                                  str(folder), "--n-examples", "9", "--json"], {}))
    assert pushed["metadata"]["start_revision"] is None

    push(fed, "bob", write_upload(fed.init_folder(), tmp_path / "bob", seed=1, group=0, rank=4))
    run_round(fed)
    revision = latest_personalized_revision(fed, fed.member("alice").repo_id)
    run_cli(["pull", address, "--client", "alice", "--out", str(folder), "--or-init"], {})
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3),
        str(folder), is_trainable=True)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.01)
    model.save_pretrained(str(folder))
    pushed = json_output(run_cli(["push", address, "--client", "alice", "--adapter",
                                  str(folder), "--json"], {}))
    assert pushed["metadata"]["start_revision"] == revision  # what pull noted
    assert run_round(fed)["inputs"]["alice"]["staleness"] == 0
