"""Map a module name to its transformer block ("layer"), for per-layer similarity."""

from __future__ import annotations

import re

# Block containers across families: Llama/Mistral `layers.N`, BERT `layer.N`, GPT-2 `h.N`,
# T5 `block.N`, ViT/others `blocks.N`. The leftmost match wins (T5's `block.0.layer.1`).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?=\.|$)")


def layer_of(module_name: str) -> str:
    """The block a module belongs to, e.g. ``model.layers.3``; a module with no block
    index (a classifier head) is its own layer."""
    match = _BLOCK.search(module_name)
    if not match:
        return module_name.rsplit(".", 1)[0] if module_name.endswith((".weight", ".bias")) \
            else module_name
    return module_name[: match.end()].lstrip(".")


def layer_sort_key(layer: str) -> tuple:
    """Sort blocks numerically (layers.2 before layers.10), non-block layers last."""
    parts = re.split(r"(\d+)", layer)
    has_block = _BLOCK.search(layer) is not None
    return (not has_block, *[(0, int(p)) if p.isdigit() else (1, p) for p in parts])
