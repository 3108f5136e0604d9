"""Similarity heatmaps (PNG) for the CLI, model cards and the federation dashboard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def save_heatmap(
    matrices: Mapping[str, torch.Tensor],
    labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "Task-vector cosine similarity",
    max_panels: int = 12,
) -> Path:
    """Draw one heatmap per matrix (model first, then layers) into a single PNG.

    Args:
        matrices: panel title → K×K cosine matrix.
        labels: the K client names.
        path: the PNG to write.
        max_panels: panels beyond this are left out (evenly subsampled) to stay legible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(matrices.items())
    if len(items) > max_panels:
        step = (len(items) - 1) / (max_panels - 1)
        items = [items[round(i * step)] for i in range(max_panels)]
    cols = min(len(items), 4)
    rows = (len(items) + cols - 1) // cols
    k = len(labels)
    # Capped, so a federation of hundreds of clients still draws a PNG of sane size.
    cell = min(max(2.6, 0.45 * k + 1.2), 12.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.0, cell * rows + 0.8),
                             squeeze=False)
    image = None
    for ax, (name, matrix) in zip(axes.flat, items, strict=False):
        values = matrix.detach().to(torch.float64).cpu().numpy()
        image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9)
        if k <= 48:  # beyond that the names cannot be read anyway
            ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(k), labels, fontsize=7)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                            fontsize=6, color="white" if abs(values[i, j]) > 0.6 else "black")
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
