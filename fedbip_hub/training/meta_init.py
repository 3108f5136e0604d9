"""The initial adapter without the base model in memory (ALGORITHM.md §7).

``fedbip init`` needs only what the initial adapter holds: LoRA factors (A seeded
random, B zero) and, for sequence classification, the head PEFT saves beside them
(``modules_to_save``). PEFT's default LoRA init never reads the base weight it wraps,
only its shape, dtype and device, so the base is built on the meta device (accelerate's
``init_empty_weights``) and each base weight is then replaced by a stand-in: a real CPU
tensor of the right shape and dtype that is a zero-stride view of a single scalar (one
element of storage, and any write to it fails loudly). Only the head is materialised:
read from the checkpoint's safetensors (just those tensors), or initialised the way
``from_pretrained`` initialises missing weights when the checkpoint has no head.

The random draws are the full load's, in the same order: ``from_pretrained`` draws only
for the weights the checkpoint lacks, then ``get_peft_model`` draws the LoRA factors. So
the result is tensor-exact with loading the whole base (tests/test_meta_init.py checks it).

Anything this cannot reproduce exactly returns None, and the caller loads the whole
base instead: a checkpoint that is not safetensors (pickles), a pre-quantized one,
weights the checkpoint lacks outside the head (their random init would shift every later
draw), or an adapter tensor that would come out of a stand-in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fedbip_hub.federation.config import FederationConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
HEAD_NAMES = ("classifier", "score")  # what PEFT saves beside the LoRA for SEQ_CLS


def build_on_meta(config: FederationConfig, lora_config: Any, *, token: str | None = None
                  ) -> Any | None:
    """The seeded PeftModel of the initial adapter, with no base weight materialised;
    None when only a full load reproduces it (see the module's docstring)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model

    try:
        checkpoint = _Checkpoint.find(config, token=token)
        model_config = _model_config(config, token=token)
    except (OSError, ValueError):
        return None  # the full load reports it, with its hint
    if checkpoint is None or getattr(model_config, "quantization_config", None):
        return None  # pre-quantized weights load into other layer types
    auto = _auto_class(config)
    dtype = _load_dtype(model_config)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(model_config, dtype=dtype)
    heads = _head_modules(model) if config.task_type == "SEQ_CLS" else []
    head_keys = {f"{name}.{key}" for name, module in heads
                 for key, _ in module.named_parameters()}
    state_keys = set(model.state_dict())
    present = checkpoint.model_keys(model, state_keys)
    missing = state_keys - set(present) - _tied_targets(model)
    if missing - head_keys:
        return None  # their init would draw before the LoRA's: only a full load matches
    try:
        _materialise_heads(heads, present, checkpoint)
    except OSError:  # a shard that cannot be fetched: the full load reports it
        return None
    _stand_in_for_meta(model)
    try:
        _init_missing(model, missing)
    except RuntimeError:  # an init that writes a base weight in place (a stand-in refuses)
        return None
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None):
        eos = model.config.eos_token_id  # as load_base_model does
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.name_or_path = config.base_model
    peft_model = get_peft_model(model, lora_config)
    from peft import get_peft_model_state_dict

    if any(_is_stand_in(t) for t in get_peft_model_state_dict(peft_model).values()):
        return None  # PEFT wrapped a module we did not materialise
    return peft_model


# -- the checkpoint --------------------------------------------------------------------
class _Checkpoint:
    """The base's safetensors: its key list, and single tensors read on demand.

    A sharded checkpoint's keys come from its index, and a shard is fetched only when a
    head tensor is read from it: on the Hub, init downloads the config, the index and at
    most the head's shard, never the whole base.
    """

    def __init__(self, config: FederationConfig, files: dict[str, str], *,
                 token: str | None):
        self.config, self.files, self.token = config, files, token  # key → file name
        self._paths: dict[str, str] = {}

    @classmethod
    def find(cls, config: FederationConfig, *, token: str | None) -> _Checkpoint | None:
        index = _resolve(config, SAFE_INDEX, token=token)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            return cls(config, dict(weight_map), token=token)
        single = _resolve(config, SAFE_WEIGHTS, token=token)
        if single is None:
            return None  # pickled weights only: from_pretrained reads them whole
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:  # the header only
            checkpoint = cls(config, dict.fromkeys(handle.keys(), SAFE_WEIGHTS), token=token)
        checkpoint._paths[SAFE_WEIGHTS] = single
        return checkpoint

    def model_keys(self, model: Any, state_keys: set[str]) -> dict[str, str]:
        """Model key → checkpoint key, for checkpoints saved with or without the base
        model's prefix (a ``LlamaModel`` checkpoint loaded as a classifier, say)."""
        prefix = getattr(model, "base_model_prefix", "")
        out: dict[str, str] = {}
        for key in self.files:
            for candidate in (key, f"{prefix}.{key}" if prefix else key,
                              key[len(prefix) + 1:] if prefix and key.startswith(f"{prefix}.")
                              else key):
                if candidate in state_keys:
                    out.setdefault(candidate, key)
                    break
        return out

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        name = self.files[key]
        if name not in self._paths:
            path = _resolve(self.config, name, token=self.token)
            if path is None:
                raise OSError(f"{name} of {self.config.base_model} is missing")
            self._paths[name] = path
        with safe_open(self._paths[name], framework="pt") as handle:
            return handle.get_tensor(key)


def _resolve(config: FederationConfig, filename: str, *, token: str | None) -> str | None:
    """A file of the base (local folder or Hub, downloaded to the cache), or None."""
    folder = Path(config.base_model)
    if folder.is_dir():
        path = folder / filename
        return str(path) if path.is_file() else None
    from transformers.utils import cached_file

    return cached_file(config.base_model, filename, revision=config.base_revision, token=token,
                       _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


# -- the model skeleton ----------------------------------------------------------------
def _model_config(config: FederationConfig, *, token: str | None) -> Any:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"revision": config.base_revision, "token": token}
    if config.task_type == "SEQ_CLS":
        kwargs["num_labels"] = config.num_labels or 2
    return AutoConfig.from_pretrained(config.base_model, **kwargs)


def _auto_class(config: FederationConfig) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return (AutoModelForSequenceClassification if config.task_type == "SEQ_CLS"
            else AutoModelForCausalLM)


def _load_dtype(model_config: Any) -> torch.dtype:
    """What ``from_pretrained``'s default (``dtype="auto"``) loads in: the config's
    dtype, else torch's default."""
    dtype = getattr(model_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()


def _head_modules(model: Any) -> list[tuple[str, Any]]:
    """The modules PEFT keeps a trainable copy of, by PEFT's rule (a name ending in one
    of the head names), outermost only."""
    found: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if name and name.endswith(HEAD_NAMES) and not any(
                name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return found


def _materialise_heads(heads: list[tuple[str, Any]], present: dict[str, str],
                       checkpoint: _Checkpoint) -> None:
    """The heads on the CPU, with the checkpoint's values where it has them (the rest
    is initialised by ``_init_missing``)."""
    for name, module in heads:
        module.to_empty(device="cpu")
        for key, _ in module.named_parameters():
            if f"{name}.{key}" in present:
                with torch.no_grad():
                    module.get_parameter(key).copy_(
                        checkpoint.tensor(present[f"{name}.{key}"]))


def _tied_targets(model: Any) -> set[str]:
    """Keys ``from_pretrained`` fills by tying (an untied lm_head is not one)."""
    try:
        return set(model.get_expanded_tied_weights_keys(all_submodels=True))
    except (AttributeError, TypeError):
        return set()


def _stand_in(shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype).expand(*shape)


def _is_stand_in(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and tensor.untyped_storage().nbytes() <= tensor.element_size()


def _stand_in_for_meta(model: Any) -> None:
    """Replace every meta parameter and buffer by a stand-in (see the module docstring)."""
    for module in model.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                setattr(module, key, torch.nn.Parameter(_stand_in(param.shape, param.dtype),
                                                        requires_grad=param.requires_grad))
        for key, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device.type == "meta":
                module.register_buffer(key, _stand_in(buffer.shape, buffer.dtype),
                                       persistent=key not in module._non_persistent_buffers_set)


def _init_missing(model: Any, missing: set[str]) -> None:
    """Initialise the head weights the checkpoint lacks as ``from_pretrained`` does: its
    ``initialize_weights`` over the model, every other weight flagged as loaded."""
    if not missing:
        return
    for module in model.modules():  # from_config's own (meta) init flagged them all
        module._is_hf_initialized = False
    for key, tensor in model.state_dict(keep_vars=True).items():
        tensor._is_hf_initialized = key not in missing
    model.initialize_weights()
