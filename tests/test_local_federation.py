"""A local federation a user can load and run from anywhere: the README's loading snippet
works on a local member's personalized adapter, and local paths (the federation, the base
model) are stored absolute by the Hub-id-vs-path rule of ``fedbip_hub.stores.locations``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from federation_helpers import REPO_ROOT, new_local_federation, published_tensors

from fedbip_hub.errors import ConfigError, NotFoundError
from fedbip_hub.federation.client import init_federation, personalized_folder, pull
from fedbip_hub.federation.config import FEDERATION_FILE, FederationConfig, LoraSpec
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import run_round
from fedbip_hub.stores.locations import resolve_base_model


def _readme_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"<!-- local-loading-snippet -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its local-loading snippet"
    return match[1]


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def _expected_keys(published: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]
                   ) -> dict[str, str]:
    """published key (no adapter name) → the loaded model's key for it."""
    out = {}
    for key in published:
        if ".lora_" not in key:
            continue
        stem = key.removesuffix(".weight")
        [match] = [k for k in loaded if k.endswith(f"{stem.split('base_model.model.')[-1]}"
                                                   ".default.weight")]
        out[key] = match
    return out


def test_the_readme_snippet_loads_a_local_member_s_personalized_adapter(
        tmp_path, tiny_base, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    fed = new_local_federation(tmp_path, tiny_base)
    assert run_round(fed)["status"] == "completed"
    published = published_tensors(fed, "alice")
    shutil.move(tmp_path / "fed", tmp_path / "myfed")  # the README's name, relative
    monkeypatch.chdir(tmp_path)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3)
    scope = {"base": base}
    exec(_readme_snippet(), scope)
    model = scope["model"]
    loaded = _lora_weights(model)
    pairs = _expected_keys(published, loaded)
    assert pairs, "no LoRA weights were loaded"
    for key, loaded_key in pairs.items():
        torch.testing.assert_close(loaded[loaded_key], published[key], rtol=0, atol=0)

    # `fedbip pull` writes a folder of one's own that PEFT loads the same way
    from peft import PeftModel

    moved = Federation.at("./myfed")
    pulled = pull(moved, "alice", tmp_path / "alice-personalized")
    again = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3),
        str(pulled.folder))
    for key, value in _lora_weights(again).items():
        torch.testing.assert_close(value, loaded[key], rtol=0, atol=0)
    assert json.loads((pulled.folder / "fedbip_start.json").read_text())[
        "start_revision"] == pulled.revision


def test_personalized_folder_refuses_a_member_without_a_round(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base, push_all=False)
    with pytest.raises(NotFoundError) as caught:
        personalized_folder(fed, "alice")
    assert "fedbip-server run" in caught.value.hint


def test_relative_local_paths_are_stored_absolute(tmp_path, tiny_base, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_base, work / "tiny-base")
    monkeypatch.chdir(work)
    config = FederationConfig(name="myfed", base_model="./tiny-base", num_labels=3,
                              lora=LoraSpec(r=4, alpha=8))
    fed = init_federation("./myfed", config)
    assert fed.address == str(work / "myfed")
    stored = json.loads(fed.store.read_bytes(fed.repo_id, FEDERATION_FILE, fed.head()))
    assert stored["base_model"] == str(work / "tiny-base")
    init_config = json.loads((fed.init_folder() / "adapter_config.json").read_text())
    assert init_config["base_model_name_or_path"] == str(work / "tiny-base")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # what cron's $HOME is to the federation
    from fedbip_hub.training.models import load_base_model

    again = Federation.at(str(work / "myfed"))
    assert load_base_model(again.config()).config.num_labels == 3


def test_the_hub_id_versus_path_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_base_model("org/name") == "org/name"  # a Hub id, as typed
    Path("org/name").mkdir(parents=True)
    assert resolve_base_model("org/name") == str(tmp_path / "org/name")  # a directory wins
    for missing in ("./nowhere", "../nowhere", "/nowhere/base", "~/nowhere-fedbip"):
        with pytest.raises(ConfigError) as caught:
            resolve_base_model(missing)
        assert "looks like a local path" in caught.value.message
        assert "Hub model id" in caught.value.hint  # the other reading
