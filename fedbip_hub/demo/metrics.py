"""Metrics of the demo and the quality benchmark: pairwise AUC, summaries, mean ± std."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney U / n₊n₋).

    Each positive counts the negatives below it and half those equal to it, by binary
    search in the sorted negatives: O(n log n). NaN when either side is empty.
    """
    pos = torch.as_tensor(list(positives), dtype=torch.float64)
    neg = torch.as_tensor(list(negatives), dtype=torch.float64).sort().values
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    below = torch.searchsorted(neg, pos)  # negatives < p
    up_to = torch.searchsorted(neg, pos, right=True)  # negatives <= p
    return int((below + up_to).sum()) / (2 * pos.numel() * neg.numel())


def pair_scores(matrix: torch.Tensor | Sequence[Sequence[float]], groups: Sequence[str]
                ) -> tuple[list[float], list[float]]:
    """Off-diagonal entries i<j of a symmetric matrix, split into same-group and
    different-group pairs."""
    values = torch.as_tensor(matrix, dtype=torch.float64)
    same, different = [], []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            (same if groups[i] == groups[j] else different).append(float(values[i, j]))
    return same, different


def group_auc(matrix: torch.Tensor | Sequence[Sequence[float]], groups: Sequence[str]
              ) -> float:
    """How well a similarity matrix separates same-group from different-group pairs."""
    return auc(*pair_scores(matrix, groups))


def separation(matrix: torch.Tensor | Sequence[Sequence[float]], groups: Sequence[str]
               ) -> dict[str, float]:
    """AUC plus the mean same-group and different-group similarity and their gap, in
    units of the spread of all pairs (a scale-free margin)."""
    same, different = pair_scores(matrix, groups)
    every = same + different
    mean_same = sum(same) / len(same) if same else float("nan")
    mean_diff = sum(different) / len(different) if different else float("nan")
    spread = statistics.stdev(every) if len(every) > 1 else 0.0
    return {"auc": auc(same, different), "mean_same": mean_same, "mean_different": mean_diff,
            "min": min(every, default=float("nan")), "max": max(every, default=float("nan")),
            "gap_over_spread": (mean_same - mean_diff) / spread if spread > 0 else float("nan")}


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """K×K cosines of the rows of a K×D matrix, in float64."""
    vectors = vectors.to(torch.float64)
    norms = vectors.norm(dim=1).clamp_min(1e-300)
    return (vectors @ vectors.T) / (norms[:, None] * norms[None, :])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are dropped."""
    clean = [float(v) for v in values if not math.isnan(float(v))]
    if not clean:
        return float("nan"), float("nan")
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


def group_means(per_client: Mapping[str, float], groups: Mapping[str, str]
                ) -> dict[str, float]:
    """Mean of a per-client value within each group, in first-seen group order."""
    out: dict[str, list[float]] = {}
    for client, value in per_client.items():
        out.setdefault(groups[client], []).append(float(value))
    return {g: sum(v) / len(v) for g, v in out.items()}
