"""Similarity heatmaps (PNG) for the CLI, model cards and the federation dashboard.

Every figure says what it shows (``source``: this round's cosines, or the similarity
memory's), fills its grid (no empty panels: extra layer panels are subsampled), and sizes
each panel for its longest client name, so tick labels never run into the neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

ROUND_COSINE = "this round's task-vector cosine"
MEMORY_COSINE = "similarity memory (task-vector evidence accumulated over rounds)"
MAX_COLS = 5
MAX_LABEL = 28  # characters; longer names are shortened in the middle
TICK_FONT = 7


def short_label(name: str, limit: int = MAX_LABEL) -> str:
    """``very-long-client-name-of-an-org`` → ``very-long-cli…e-of-an-org`` (keeps both ends,
    which is where names differ)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[len(name) - (limit - 1 - head):]}"


def grid_shape(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    """(rows, cols) for n panels with no empty cell, as square as the width allows; n
    itself must be fillable (see ``fillable``)."""
    for rows in range(max(1, -(-n // max_cols)), n + 1):
        if n % rows == 0 and n // rows <= max_cols:
            return rows, n // rows
    return n, 1


def fillable(n: int, max_cols: int = MAX_COLS) -> int:
    """The most panels, at most n, that fill a grid of at most ``max_cols`` columns with
    no empty cell and more than one column (a prime count above ``max_cols`` loses one)."""
    for count in range(n, 1, -1):
        if count <= max_cols or grid_shape(count, max_cols)[1] > 1:
            return count
    return min(n, 1)


def pick_panels(items: list, limit: int, keep_first: int) -> list:
    """At most ``limit`` panels that fill their grid: the first ``keep_first`` always,
    the rest evenly subsampled."""
    count = fillable(min(len(items), limit))
    if count >= len(items):
        return items
    kept, rest = items[:keep_first], items[keep_first:]
    need = max(0, count - len(kept))
    if need == 0:
        return kept[:count]
    if need == 1:
        return [*kept, rest[0]]
    step = (len(rest) - 1) / (need - 1)
    return [*kept, *(rest[round(i * step)] for i in range(need))]


def save_heatmap(
    matrices: Mapping[str, torch.Tensor],
    labels: Sequence[str],
    path: str | Path,
    *,
    source: str = ROUND_COSINE,
    title: str = "Cosine similarity between clients",
    max_panels: int = 12,
    keep_first: int = 1,
) -> Path:
    """Draw one heatmap per matrix (model first, then layers) into a single PNG.

    Args:
        matrices: panel title → K×K cosine matrix.
        labels: the K client names.
        path: the PNG to write.
        source: what the cosines are (``ROUND_COSINE``, ``MEMORY_COSINE`` or your own
            words); the title says it.
        max_panels: at most this many panels (evenly subsampled) to stay legible.
        keep_first: panels always drawn (the model-level ones); the others are subsampled
            so that the grid has no empty panel.
    """
    import matplotlib.pyplot as plt

    fig = draw_heatmap(matrices, labels, source=source, title=title, max_panels=max_panels,
                       keep_first=keep_first)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_heatmap(matrices: Mapping[str, torch.Tensor], labels: Sequence[str], *,
                 source: str = ROUND_COSINE, title: str = "Cosine similarity between clients",
                 max_panels: int = 12, keep_first: int = 1):
    """The figure ``save_heatmap`` writes (a matplotlib Figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = pick_panels(list(matrices.items()), max_panels, keep_first)
    rows, cols = grid_shape(len(items))
    k = len(labels)
    names = [short_label(str(n)) for n in labels]
    show_names = k <= 48  # beyond that the names cannot be read anyway
    # Room for the y tick labels (left) and rotated x tick labels (below) of each panel.
    label_in = (max(map(len, names), default=1) * TICK_FONT * 0.62 / 72 + 0.15
                if show_names else 0.2)
    # The square itself, capped so that hundreds of clients still draw a sane PNG.
    square = min(max(2.2, 0.22 * k + 1.0), 10.0)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * (square + label_in) + 1.2,
                                      rows * (square + label_in + 0.4) + 0.8))
    image = None
    for ax, (name, matrix) in zip(axes.flat, items, strict=True):
        values = matrix.detach().to(torch.float64).cpu().numpy()
        image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9, wrap=True)
        if show_names:
            ax.set_xticks(range(k), names, rotation=90, fontsize=TICK_FONT)
            ax.set_yticks(range(k), names, fontsize=TICK_FONT)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                            fontsize=6, color="white" if abs(values[i, j]) > 0.6 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine")
    fig.suptitle(f"{title}\n{source}", fontsize=11)
    return fig
