"""`fedbip init` builds the initial adapter with the base on the meta device, and the
adapter is byte-for-byte the one loading the whole base gives (the old path, kept as
``low_memory=False`` and as the fallback)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from federation_helpers import TINY_LLAMA
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)

from fedbip_hub.federation.config import FederationConfig, LoraSpec
from fedbip_hub.training.meta_init import build_on_meta
from fedbip_hub.training.models import build_initial_adapter, lora_config_for

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _save(kind: str, folder: Path) -> Path:
    torch.manual_seed(1)
    if kind == "seq-cls":  # a classifier checkpoint: the head is read from it
        LlamaForSequenceClassification(LlamaConfig(**TINY_LLAMA, num_labels=3)
                                       ).save_pretrained(folder)
    elif kind == "causal":  # a causal LM loaded as a classifier: the head is initialised
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    elif kind == "bare":  # saved without the model prefix or any head
        LlamaModel(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    elif kind == "tied":  # lm_head tied to the embeddings: not in the checkpoint
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True)
                         ).save_pretrained(folder)
    elif kind == "bf16":
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, dtype="bfloat16")).to(
            torch.bfloat16).save_pretrained(folder)
    elif kind == "bert":  # classifier (weight and bias) missing, pooler present
        BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64)
                  ).save_pretrained(folder)
    return folder


CASES = {
    "classifier checkpoint": ("seq-cls", "SEQ_CLS", 3, ["q_proj", "v_proj"]),
    "head initialised": ("causal", "SEQ_CLS", 2, ["q_proj", "v_proj"]),
    "head initialised, every linear": ("causal", "SEQ_CLS", 2, ALL_LINEAR),
    "no prefix in the checkpoint": ("bare", "SEQ_CLS", 2, ["q_proj", "v_proj"]),
    "bf16 checkpoint": ("bf16", "SEQ_CLS", 2, ["q_proj", "v_proj"]),
    "bert": ("bert", "SEQ_CLS", 2, ["query", "value"]),
    "causal lm": ("causal", "CAUSAL_LM", None, ["q_proj", "v_proj"]),
    "causal lm, tied embeddings": ("tied", "CAUSAL_LM", None, ["q_proj", "v_proj"]),
}


def _config(folder: Path, task: str, labels: int | None, targets: list[str]) -> FederationConfig:
    return FederationConfig(name="fed", base_model=str(folder), task_type=task,
                            num_labels=labels, lora=LoraSpec(target_modules=targets), seed=7)


def _same_adapter(a: Path, b: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("case", list(CASES))
def test_the_meta_device_init_is_the_full_load_init_byte_for_byte(tmp_path, case):
    kind, task, labels, targets = CASES[case]
    config = _config(_save(kind, tmp_path / "base"), task, labels, targets)
    torch.manual_seed(config.seed)
    on_meta = build_on_meta(config, lora_config_for(config))
    assert on_meta is not None, "this base must take the meta-device path"
    # no base weight was materialised: each one is a one-element stand-in
    base_params = [p for n, p in on_meta.named_parameters()
                   if "lora_" not in n and "modules_to_save" not in n
                   and "original_module" not in n]
    assert base_params and all(p.untyped_storage().nbytes() <= p.element_size()
                               for p in base_params)
    full = build_initial_adapter(config, tmp_path / "full", low_memory=False)
    meta = build_initial_adapter(config, tmp_path / "meta")
    _same_adapter(full, meta)


def test_a_head_the_checkpoint_lacks_is_initialised_not_left_empty(tmp_path):
    from safetensors.torch import load_file

    config = _config(_save("causal", tmp_path / "base"), "SEQ_CLS", 2, ["q_proj"])
    head = load_file(build_initial_adapter(config, tmp_path / "meta")
                     / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert 0.01 < float(head.std()) < 0.03  # normal(0, initializer_range = 0.02)


def test_weights_missing_outside_the_head_fall_back_to_the_full_load(tmp_path):
    # a bare LlamaModel has no (untied) lm_head: from_pretrained initialises it, which
    # draws before the LoRA does, so only a full load gives the same factors
    config = _config(_save("bare", tmp_path / "base"), "CAUSAL_LM", None, ["q_proj"])
    assert build_on_meta(config, lora_config_for(config)) is None
    _same_adapter(build_initial_adapter(config, tmp_path / "full", low_memory=False),
                  build_initial_adapter(config, tmp_path / "auto"))


def test_a_checkpoint_without_safetensors_falls_back_to_the_full_load(tmp_path):
    from safetensors.torch import load_file

    folder = _save("seq-cls", tmp_path / "base")
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")  # pickles only
    weights.unlink()
    config = _config(folder, "SEQ_CLS", 3, ["q_proj"])
    assert build_on_meta(config, lora_config_for(config)) is None
