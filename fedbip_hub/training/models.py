"""Load the federation's base model and build its initial adapter (ALGORITHM.md §7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.config import FederationConfig


def load_base_model(config: FederationConfig, *, dtype: torch.dtype | None = None,
                    token: str | None = None) -> Any:
    """The base model for the federation's task (any model id or local path); ``token``
    reaches the Hub download (None: HF_TOKEN or the stored login).

    Raises:
        ConfigError: the model cannot be loaded (names the id and what to check).
    """
    kwargs: dict[str, Any] = {"revision": config.base_revision, "token": token}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = model_for_task(config, **kwargs)
    except (OSError, ValueError) as exc:
        from fedbip_hub.stores.locations import is_local_path

        hint = ("Check the model id or path and your access to it (a private or gated "
                "base needs --token); offline, point --base-model at a local folder.")
        if is_local_path(config.base_model) and not Path(config.base_model).is_dir():
            hint = ("The federation's base model is a local folder of the machine that "
                    "created it: put a copy at that same path here, or have the federation "
                    "re-created with a Hub model id.")
        raise ConfigError(
            f"cannot load base model {config.base_model!r} "
            f"(revision {config.base_revision or 'default'}): {str(exc).splitlines()[0]}",
            hint=hint) from exc
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None):
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def model_for_task(config: FederationConfig, **kwargs: Any) -> Any:
    """``from_pretrained`` of the federation's base with the head its task needs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if config.task_type == "SEQ_CLS":
        return AutoModelForSequenceClassification.from_pretrained(
            config.base_model, num_labels=config.num_labels or 2, **kwargs)
    return AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)


def lora_config_for(config: FederationConfig, *, inference_mode: bool = False) -> Any:
    from peft import LoraConfig, TaskType

    spec = config.lora
    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora, lora_dropout=spec.dropout,
        task_type=TaskType.SEQ_CLS if config.task_type == "SEQ_CLS" else TaskType.CAUSAL_LM,
        inference_mode=inference_mode,
    )


def build_initial_adapter(config: FederationConfig, dest: str | Path, *,
                          token: str | None = None, low_memory: bool = True) -> Path:
    """Seeded LoRA init (A random, B zero) plus the initial head, saved by PEFT.

    Every client's first round starts here, so first-round task vectors share one zero
    point and freshly initialised heads stay comparable. With ``low_memory`` the base is
    built on the meta device and only the LoRA factors and the head are materialised
    (fedbip_hub.training.meta_init); where that cannot reproduce the full load exactly, or with
    ``low_memory=False``, the whole base is loaded. Both give the same adapter.
    """
    peft_model = None
    if low_memory:
        from fedbip_hub.training.meta_init import build_on_meta

        torch.manual_seed(config.seed)
        peft_model = build_on_meta(config, lora_config_for(config), token=token)
    if peft_model is None:
        from peft import get_peft_model

        torch.manual_seed(config.seed)
        peft_model = get_peft_model(load_base_model(config, token=token),
                                    lora_config_for(config))
    dest = Path(dest)
    peft_model.save_pretrained(str(dest))
    stamp_base_model(dest, config)
    return dest


def stamp_base_model(folder: Path, config: FederationConfig) -> None:
    """Record the federation's base model id and revision in an adapter's config."""
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = config.base_model
    data["revision"] = config.base_revision
    if isinstance(data.get("target_modules"), list):  # PEFT keeps a set: order by hash seed
        data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2) + "\n")
