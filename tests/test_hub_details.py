"""Hub details of `fedbip init` (issue 13 item 6), over real HTTP against the local Hub:
card metadata holds only Hub ids for base_model, a failed init leaves no repo, and
--token reaches the base model's and tokenizer's downloads (no HF_TOKEN anywhere)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from federation_helpers import TINY_LLAMA, run_cli
from huggingface_hub import ModelCard

from fedbip_hub.errors import FedbipError
from fedbip_hub.federation.client import init_federation
from fedbip_hub.federation.config import FederationConfig

OTHER_TOKEN = "hf_fedbip_other_user_token"


def _no_token_env(tmp_path) -> dict[str, str]:
    """A CLI environment with no token at all: no HF_TOKEN, a fresh HF_HOME (no login)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HOME")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env["FEDBIP_CACHE"] = str(tmp_path / "fedbip-cache")
    return env


def _cli(args, env, *, check=True):
    import subprocess
    import sys

    from federation_helpers import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    return result


def _tiny_hub_base(hub, repo_id: str, folder, *, head: bool = False) -> None:
    """A private base repo on the local Hub: a tiny causal Llama (sharded) plus a
    word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    model = (LlamaForSequenceClassification(LlamaConfig(**TINY_LLAMA, num_labels=3)) if head
             else LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)))
    model.save_pretrained(folder, max_shard_size="40KB")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "good", "bad", "the", "cat"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(folder)
    hub.create_repo(repo_id, private=True, files={p.name: p.read_bytes()
                                                  for p in folder.iterdir() if p.is_file()})


def test_a_local_base_stays_out_of_the_card_metadata_of_a_hub_federation(hub, tiny_base,
                                                                         hub_env):
    # the local Hub refuses a base_model that is not a model id, as the real Hub does
    result = run_cli(["init", "fedorg/localbase", "--base-model", str(tiny_base),
                      "--num-labels", "3"], hub_env)
    said = " ".join(result.stderr.split())  # rich wraps long lines
    assert "Warning:" in said and "same path" in said
    assert f"hf upload fedorg/base {tiny_base}" in said  # the fix, spelled out
    files = hub.files("fedorg/localbase")
    card = ModelCard(files["README.md"].decode())
    assert "base_model" not in card.data.to_dict()
    assert str(tiny_base) in card.text  # still shown to readers
    assert json.loads(files["federation.json"])["base_model"] == str(tiny_base)


def test_the_local_hub_refuses_a_path_as_base_model_like_the_real_hub(hub):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("fedorg/card", private=True)
    with pytest.raises(ValueError, match=r"base_model.*is not valid"):
        api.upload_file(path_or_fileobj=b"---\nbase_model: /tmp/x/base\n---\n\n# x\n",
                        path_in_repo="README.md", repo_id="fedorg/card")
    api.upload_file(path_or_fileobj=b"---\nbase_model: fedorg/base\n---\n\n# x\n",
                    path_in_repo="README.md", repo_id="fedorg/card")


def test_init_that_fails_leaves_no_repo(hub, tiny_base):
    config = FederationConfig(name="broken", base_model="fedorg/no-such-base", num_labels=3)
    with pytest.raises(FedbipError, match="cannot load base model"):
        init_federation("fedorg/broken", config)
    assert not hub.repo_exists("fedorg/broken")  # the base is loaded before any repo

    hub.inject_fault("POST", r"/api/models/fedorg/late/commit/", status=400, times=None,
                     message="refused by the test")
    config = FederationConfig(name="late", base_model=str(tiny_base), num_labels=3)
    with pytest.raises(FedbipError):
        init_federation("fedorg/late", config)
    hub.clear_faults()
    assert not hub.repo_exists("fedorg/late")  # created, then deleted when the commit failed
    init_federation("fedorg/late", config)  # and the same init then works
    assert "federation.json" in hub.files("fedorg/late")


def test_token_reaches_the_base_model_and_tokenizer_without_hf_token(hub, hub_env, tmp_path):
    from conftest import HUB_TOKEN

    _tiny_hub_base(hub, "fedorg/private-base", tmp_path / "base")
    hub.add_token(OTHER_TOKEN, "outsider", orgs=["outsider-org"])
    env = _no_token_env(tmp_path)
    init = ["init", "--base-model", "fedorg/private-base", "--num-labels", "2", "--json"]
    # a token that cannot read the private base fails on it, and leaves nothing behind
    refused = _cli([init[0], "outsider-org/fed", *init[1:], "--token", OTHER_TOKEN], env,
                   check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "fedorg/private-base" in json.loads(refused.stdout)["message"]
    assert not hub.repo_exists("outsider-org/fed")

    hub.clear_requests()
    _cli([init[0], "fedorg/tokfed", *init[1:], "--token", HUB_TOKEN], env)
    card = ModelCard(hub.files("fedorg/tokfed")["README.md"].decode())
    assert card.data.to_dict()["base_model"] == "fedorg/private-base"  # a Hub id: kept
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests
               if "/fedorg/private-base/resolve/" in r.path and r.status == 200}
    # the meta-device init read the config and the index, never a weights shard (the
    # checkpoint has no classifier head to read)
    assert "config.json" in fetched and "model.safetensors.index.json" in fetched
    assert not any(name.endswith(".safetensors") for name in fetched), fetched

    _cli(["join", "fedorg/tokfed", "--client", "alice", "--token", HUB_TOKEN], env)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": int("good" in t)}) + "\n"
                            for t in ("good cat", "bad cat", "the good", "the bad")))
    scored = _cli(["eval", "fedorg/tokfed", "--client", "alice", "--data", str(data),
                   "--split", "train", "--device", "cpu", "--token", HUB_TOKEN, "--json"], env)
    assert json.loads(scored.stdout)["base"]["accuracy"] is not None
    trained = _cli(["train", "fedorg/tokfed", "--client", "alice", "--data", str(data),
                    "--out", str(tmp_path / "alice-out"), "--max-steps", "1", "--batch-size",
                    "4", "--device", "cpu", "--token", HUB_TOKEN, "--push", "--json"], env)
    # the private base and its tokenizer loaded with --token alone (no HF_TOKEN, no login)
    assert json.loads(trained.stdout)["ok"]
