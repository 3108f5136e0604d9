"""Builders of LoRA adapter folders and independent (PEFT-computed) references for tests.

Two ways to make an adapter:

* :func:`write_raw_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors``
  by hand (never through our writer), so malformed adapters are easy to produce too;
* :func:`make_peft_adapter` trains nothing but builds a real PEFT adapter on a tiny Llama
  (``init_lora_weights=False``, so B ≠ 0) and saves it with ``save_pretrained``.

:func:`peft_reference` loads any adapter that fits the tiny Llama with
``PeftModel.from_pretrained`` and asks each LoRA layer for ``get_delta_weight``: that is the
brute-force ΔW (scaling by alpha/r, rsLoRA alpha/√r, rank_pattern and alpha_pattern all
done by PEFT itself) that our engine is compared against. The base model is cast to
float64 first, so the reference is exact for the float32 values stored on disk.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."
Kind = Literal["causal", "seqcls"]

# The tiny Llama every test uses: head_dim 8, 2 KV heads, so q/o are 32×32, k/v 16×32.
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
_PROJ_SHAPES = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32),
                "o_proj": (32, 32), "gate_proj": (64, 32), "up_proj": (64, 32),
                "down_proj": (32, 64)}
NUM_LABELS = 3


def llama_shapes(targets: Sequence[str] = ("q_proj", "v_proj"), layers: int = 2
                 ) -> dict[str, tuple[int, int]]:
    """Module name → (out, in) of the tiny Llama's targeted linear layers."""
    out = {}
    for layer in range(layers):
        for target in targets:
            group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out[f"model.layers.{layer}.{group}.{target}"] = _PROJ_SHAPES[target]
    return out


def tiny_llama_config(num_labels: int = NUM_LABELS):
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_LLAMA, num_labels=num_labels, pad_token_id=0)


def tiny_base(kind: Kind = "causal", *, seed: int = 0, num_labels: int = NUM_LABELS,
              dtype: torch.dtype = torch.float32):
    """A freshly initialised tiny Llama (same seed → same weights), in eval mode."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cls = LlamaForSequenceClassification if kind == "seqcls" else LlamaForCausalLM
    model = cls(tiny_llama_config(num_labels))
    return model.to(dtype).eval()


def _suffix_lookup(patterns: Mapping[str, float] | None, name: str):
    """Plain-name lookup (first key equal to the name or a dot-suffix of it)."""
    for key, value in (patterns or {}).items():
        if name == key or name.endswith("." + key):
            return value
    return None


def write_raw_adapter(
    folder: str | Path,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    *,
    r: int = 4,
    lora_alpha: float = 8.0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
    modules_to_save: Sequence[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    task_type: str | None = None,
    config_overrides: Mapping[str, object] | None = None,
    tensor_overrides: Mapping[str, torch.Tensor | None] | None = None,
) -> Path:
    """Write a LoRA adapter folder by hand.

    Args:
        folder: where to write (created).
        shapes: module name → (out, in); the tiny Llama's q/v projections by default.
        r, lora_alpha, use_rslora, rank_pattern, alpha_pattern: as in ``LoraConfig``
            (pattern keys here are plain module names or dot-suffixes).
        dense: ``modules_to_save`` tensors, by parameter name (``lm_head.weight``).
        modules_to_save: defaults to the modules owning the ``dense`` tensors.
        seed: seeds the random A and B (both non-zero).
        dtype: the stored dtype.
        config_overrides: keys written over the generated adapter_config.json.
        tensor_overrides: full key → tensor (replaced/added), or None (removed).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = dict(llama_shapes() if shapes is None else shapes)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (d_out, d_in) in shapes.items():
        rank = _suffix_lookup(rank_pattern, name) or r
        a = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
        b = torch.randn(d_out, rank, generator=gen) / math.sqrt(rank)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    dense = dict(dense or {})
    for name, value in dense.items():
        tensors[PREFIX + name] = value.to(dtype).contiguous()
    for key, value in (tensor_overrides or {}).items():
        if value is None:
            tensors.pop(key, None)
        else:
            tensors[key] = value.contiguous()
    if modules_to_save is None:
        modules_to_save = sorted({name.rsplit(".", 1)[0] for name in dense}) or None
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in shapes}),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "task_type": task_type,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def make_peft_adapter(
    folder: str | Path,
    *,
    kind: Kind = "causal",
    r: int = 4,
    lora_alpha: float = 8.0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    base_seed: int = 0,
    head_noise: float = 0.5,
) -> Path:
    """A real PEFT LoRA adapter on the tiny Llama, saved with ``save_pretrained``.

    For ``kind="seqcls"`` PEFT saves the classifier (``score``) through modules_to_save;
    its copy is perturbed (seeded) so that clients' heads differ.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    base = tiny_base(kind, seed=base_seed)
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
        target_modules=list(target_modules), init_lora_weights=False, lora_dropout=0.0,
        task_type=TaskType.SEQ_CLS if kind == "seqcls" else TaskType.CAUSAL_LM,
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    if kind == "seqcls" and head_noise:
        gen = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            for module in _saved_copies(model).values():
                for param in module.parameters():
                    param.add_(head_noise * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(folder))
    return Path(folder)


def _saved_copies(model) -> dict[str, torch.nn.Module]:
    """modules_to_save wrappers → their trainable "default" copy, keyed by our names."""
    out = {}
    for name, module in model.named_modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, torch.nn.ModuleDict) and "default" in copies:
            out[name.removeprefix(PREFIX)] = copies["default"]
    return out


@dataclass
class Reference:
    """ΔW per LoRA module and the dense tensors per parameter, from PEFT (float64)."""

    deltas: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    ranks: dict[str, int]
    scalings: dict[str, float]

    def flat(self, include_dense: bool = True, names: Sequence[str] | None = None
             ) -> torch.Tensor:
        items = {**self.deltas, **(self.dense if include_dense else {})}
        keys = sorted(items) if names is None else list(names)
        return torch.cat([items[k].reshape(-1) for k in keys])


def load_peft(folder: str | Path, *, kind: Kind = "causal", base_seed: int = 0,
              dtype: torch.dtype = torch.float64):
    """``PeftModel.from_pretrained`` onto a fresh tiny base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_base(kind, seed=base_seed, dtype=dtype), str(folder))


def peft_reference(folder: str | Path, *, kind: Kind = "causal", base_seed: int = 0
                   ) -> Reference:
    """Brute-force ΔW of every LoRA module, computed by PEFT (``get_delta_weight``)."""
    from peft.tuners.lora import LoraLayer

    model = load_peft(folder, kind=kind, base_seed=base_seed)
    deltas, ranks, scalings = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            key = name.removeprefix(PREFIX)
            deltas[key] = module.get_delta_weight("default").detach().to(torch.float64)
            ranks[key] = int(module.r["default"])
            scalings[key] = float(module.scaling["default"])
    dense = {}
    for name, copy in _saved_copies(model).items():
        for pname, param in copy.named_parameters():
            dense[f"{name}.{pname}"] = param.detach().to(torch.float64).clone()
    return Reference(deltas, dense, ranks, scalings)


def brute_cosine(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """K×K cosine matrix of flattened float64 vectors (0 off-diagonal for a zero vector)."""
    flat = [v.reshape(-1).to(torch.float64) for v in vectors]
    k = len(flat)
    out = torch.eye(k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            if i != j:
                ni, nj = flat[i].norm(), flat[j].norm()
                out[i, j] = 0.0 if ni == 0 or nj == 0 else flat[i] @ flat[j] / (ni * nj)
    return out
