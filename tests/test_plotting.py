"""Heatmaps: legible with long client names (no tick label runs into a neighbouring
panel), no empty panels, and a title that says which cosines they show."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from fedbip_hub.federation.plotting import (
    MEMORY_COSINE,
    draw_heatmap,
    fillable,
    grid_shape,
    pick_panels,
    short_label,
)

matplotlib.use("Agg")
LONG = [f"hospital-{city}-radiology-department-{i}"
        for i, city in enumerate(["amsterdam", "barcelona", "copenhagen", "dublin", "essen",
                                  "frankfurt"])]


def _panels(n: int, k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    out = {}
    for p in range(n):
        x = torch.randn(k, 4, generator=gen, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True)
        out["model" if p == 0 else f"model.layers.{p - 1}"] = x @ x.T
    return out


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("n", [1, 3, 4, 6, 7, 8])
def test_long_names_never_overlap_a_neighbouring_panel(n):
    import matplotlib.pyplot as plt

    fig = draw_heatmap(_panels(n, len(LONG)), LONG, source=MEMORY_COSINE)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if ax.images]
        boxes = [ax.get_tightbbox(renderer) for ax in panels]  # ticks and labels included
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not _overlaps(boxes[i], boxes[j]), (n, i, j)
        # every drawn panel holds a heatmap: no empty cells in the grid
        rows, cols = grid_shape(len(panels))
        assert rows * cols == len(panels) == fillable(n)
        assert all(not ax.axison or ax.images for ax in fig.axes if ax not in panels
                   and ax.get_label() != "<colorbar>")
        title = fig.get_suptitle()
        assert MEMORY_COSINE in title
        labels = [t.get_text() for t in panels[0].get_yticklabels()]
        assert labels == [short_label(name) for name in LONG]
        assert all(len(label) <= 28 for label in labels)
        assert len(set(labels)) == len(LONG)  # still tell the clients apart
    finally:
        plt.close(fig)


def test_grid_choice_has_no_empty_cell():
    for n in range(1, 40):
        count = fillable(n)
        rows, cols = grid_shape(count)
        assert rows * cols == count and cols <= 5
        assert count == n or (count == n - 1 and n > 5)  # a prime count loses one panel
        assert count <= 5 or cols > 1


def test_pick_panels_keeps_the_first_ones_and_subsamples_the_rest():
    items = [f"p{i}" for i in range(9)]  # model, raw, then 7 layers
    picked = pick_panels(items, 12, keep_first=2)
    assert picked[:2] == ["p0", "p1"] and len(picked) == fillable(9) == 9
    picked = pick_panels([f"p{i}" for i in range(7)], 12, keep_first=2)
    assert picked[:2] == ["p0", "p1"] and len(picked) == 6 and picked[-1] == "p6"
    assert pick_panels(items, 4, keep_first=1) == ["p0", "p1", "p5", "p8"]


def test_short_label_keeps_both_ends():
    assert short_label("alice") == "alice"
    label = short_label("hospital-amsterdam-radiology-department-0")
    assert len(label) == 28 and label.startswith("hospital-ams") and label.endswith("nt-0")
