"""Guards against hostile updates, before they are weighted.

* The norm guard: median/MAD outliers of task-vector norms are clipped or excluded.
  Norms are compared in log space, where a scaled attack (×100) is a shift and honest
  spread is small.
* The sign guard: an update that opposes a group of peers more than it agrees with
  anyone (a sign-flipped update) contributes to nobody else.

FedBip's similarity weighting is the last line of defence: a random update has a cosine
near 0 with everyone and so little weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 σ
MIN_LOG_SPREAD = 0.1  # ~10%: honest clients' norms are never treated as more alike


@dataclass(frozen=True)
class NormGuardResult:
    """Per client: robust z of log-norm, the factor its update is scaled by, outliers."""

    norms: torch.Tensor
    robust_z: torch.Tensor
    scale: torch.Tensor
    outliers: list[int]
    cap: float | None

    def explain(self, index: int) -> str:
        ratio = float(self.norms[index]) / float(self.norms.median())
        return (f"task-vector norm {float(self.norms[index]):.3g} is {ratio:.3g}× the "
                f"round's median (robust z {float(self.robust_z[index]):.1f})")


def norm_guard(norms: torch.Tensor, *, threshold: float = 3.0, min_clients: int = 3
               ) -> NormGuardResult:
    """Flag norms whose robust z-score of log-norm exceeds ``threshold``.

    Args:
        norms: ‖τ_k‖ for the K clients of a round.
        threshold: robust z above which a norm is an outlier (only large norms are).
        min_clients: below this many non-zero norms the guard does nothing.

    Returns:
        ``scale[k]`` brings an outlier's norm down to the cap exp(median + threshold·σ);
        other clients keep 1.
    """
    norms = norms.to(torch.float64)
    ones = torch.ones_like(norms)
    positive = norms > 0
    if int(positive.sum()) < min_clients:
        return NormGuardResult(norms, torch.zeros_like(norms), ones, [], None)
    logs = torch.where(positive, norms.clamp_min(1e-300).log(), torch.zeros_like(norms))
    center = logs[positive].median()
    spread = max(float((logs[positive] - center).abs().median()) * MAD_TO_SIGMA,
                 MIN_LOG_SPREAD)
    robust_z = torch.where(positive, (logs - center) / spread, torch.zeros_like(norms))
    cap = math.exp(float(center) + threshold * spread)
    outliers = [k for k in range(norms.numel()) if float(robust_z[k]) > threshold]
    scale = ones.clone()
    for k in outliers:
        scale[k] = cap / float(norms[k])
    return NormGuardResult(norms, robust_z, scale, outliers, cap)


@dataclass(frozen=True)
class SignGuardResult:
    """Clients whose update points away from a group of peers more than toward anyone."""

    flagged: list[int]
    support: list[float]
    opposed: list[list[int]]

    def explain(self, index: int, names: list[str]) -> str:
        against = ", ".join(names[j] for j in self.opposed[index])
        return (f"its task vector opposes {against} (cosine below "
                f"−{self.support[index]:.2f}) more strongly than it agrees with any "
                "client: the signature of a sign-flipped update")


def sign_guard(cosine: torch.Tensor, *, floor: float = 0.2, min_opposed: int = 2
               ) -> SignGuardResult:
    """Flag clients anti-aligned with at least ``min_opposed`` peers.

    Honest clients on different tasks are near-orthogonal; a sign-flipped update is the
    mirror of its own group, so its cosine with that group is about minus the group's
    cohesion, stronger than any agreement it has. Client k is flagged when at least
    ``min_opposed`` peers j have c_kj < −max(max_{j'≠k} c_kj', floor). The floor keeps
    near-orthogonal noise (small |c|) from ever counting as opposition.
    """
    cos = cosine.to(torch.float64)
    off_diagonal = ~torch.eye(cos.shape[0], dtype=torch.bool)
    best = torch.where(off_diagonal, cos, torch.full_like(cos, -1.0)).amax(dim=1)
    support = best.clamp_min(floor)
    against = off_diagonal & (cos < -support[:, None])
    opposed = [torch.nonzero(row).flatten().tolist() for row in against]
    flagged = [i for i, row in enumerate(opposed) if len(row) >= min_opposed]
    return SignGuardResult(flagged, support.tolist(), opposed)


def describe_guards(record: Mapping[str, Any]) -> dict[str, str]:
    """Client → what the round's guards did to its update, one line each (a round
    record's ``norm_guard`` and ``sign_guard`` entries, for dashboards and job logs)."""
    out: dict[str, str] = {}
    for client, entry in (record.get("norm_guard") or {}).items():
        out[client] = (f"norm guard ({entry['action']}): task-vector norm "
                       f"{entry['norm']:.3g}, robust z {entry['robust_z']:.1f}")
    for client, entry in (record.get("sign_guard") or {}).items():
        line = f"sign guard: {entry['reason']}; {entry['action']}"
        out[client] = f"{out[client]}; {line}" if client in out else line
    return out
