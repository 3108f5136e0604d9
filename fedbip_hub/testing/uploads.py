"""Synthetic "trained" adapters for tests and benchmarks: no training, reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_upload(start: Path, dest: Path, *, seed: int, group: int, rank: int | None = None,
                 step: float = 0.2) -> Path:
    """A client's "trained" adapter: its start adapter moved along a group direction.

    With ``rank`` it is a fresh LoRA of that rank (a first round from the init); without,
    it keeps the start's factors and perturbs them, as training from a personalized
    adapter would.
    """
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((start / "adapter_config.json").read_text())
    tensors = load_file(start / "adapter_model.safetensors")
    shared = torch.Generator().manual_seed(1000 + group)
    own = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sorted(tensors.items()):
        if rank is not None and ".lora_" in key:
            shape = (rank, value.shape[1]) if ".lora_A." in key else (value.shape[0], rank)
            value = torch.zeros(shape)
        direction = torch.randn(value.shape, generator=shared)
        noise = torch.randn(value.shape, generator=own)
        out[key] = (value + step * (direction + 0.3 * noise)).contiguous()
    if rank is not None:
        config.update(r=rank, lora_alpha=2 * rank, rank_pattern={}, alpha_pattern={})
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(out, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest
