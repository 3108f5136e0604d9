"""Guards against hostile updates, before they are weighted.

* The norm guard: median/MAD outliers of task-vector norms are clipped or excluded.
  Norms are compared in log space, where a scaled attack (×100) is a shift and honest
  spread is small.
* The sign guard: an update that opposes a group of peers more than it agrees with
  anyone (a sign-flipped update) contributes to nobody else.
* Duplicates: near-identical updates from different members (copies, Sybils) count once.
* Weight bounds: a cap on any one peer's weight, and a minimum number of contributors
  below which a personalized adapter keeps only its own update (privacy).

FedBip's similarity weighting is the last line of defence: a random update has a cosine
near 0 with everyone and so little weight.
"""

from __future__ import annotations

import math
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


# -- collusion and copying ------------------------------------------------------------------
@dataclass(frozen=True)
class DuplicateGroups:
    """Sets of near-identical task vectors from different members (copies, Sybils).

    ``groups[g]`` lists the indices of one set (sorted, at least two); ``kept[g]`` is the
    one that is weighted, as if it had been uploaded alone: the set's first input with no
    new upload this round (its update was applied in an earlier round, so a fresh copy
    of it is a replay), else its first input. ``cosine[g]`` is the set's lowest pairwise
    cosine, ``norm_ratio[g]`` its largest norm over its smallest.
    """

    groups: list[list[int]]
    kept: list[int]
    cosine: list[float]
    norm_ratio: list[float]

    @property
    def dropped(self) -> list[int]:
        """Inputs that count for nothing in anyone's weights this round."""
        return sorted(i for group, kept in zip(self.groups, self.kept, strict=True)
                      for i in group if i != kept)

    def kept_for(self, index: int) -> int | None:
        """The kept member of the set that ``index`` is a dropped copy in (else None)."""
        for group, kept in zip(self.groups, self.kept, strict=True):
            if index in group and index != kept:
                return kept
        return None

    def without_copies(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``values`` (per input, or K×K) with the dropped copies' entries set to ``fill``:
        a statistic over the round then counts each set once."""
        out = values.clone()
        out[self.dropped] = fill
        if out.dim() == 2:
            out[:, self.dropped] = fill
        return out

    def remap(self, old: list[str], new: list[str]) -> DuplicateGroups:
        """The same sets over the inputs ``new`` (a subset of ``old``, by name): members
        gone are dropped, and so is a set whose kept member is gone (its copies shared
        its verdict) or that has one member left."""
        where = {name: i for i, name in enumerate(new)}
        out = DuplicateGroups([], [], [], [])
        for group, kept, cos, ratio in zip(self.groups, self.kept, self.cosine,
                                           self.norm_ratio, strict=True):
            members = [where[old[i]] for i in group if old[i] in where]
            if old[kept] in where and len(members) > 1:
                out.groups.append(members)
                out.kept.append(where[old[kept]])
                out.cosine.append(cos)
                out.norm_ratio.append(ratio)
        return out

    def mask(self, k: int) -> torch.Tensor:
        """K×K bool, which peers row i may draw from: never a dropped copy, and never a
        copy of itself (a member's own update is its self term, not a peer's)."""
        allowed = torch.ones(k, k, dtype=torch.bool)
        allowed[:, self.dropped] = False
        for group in self.groups:
            index = torch.tensor(group)
            allowed[index[:, None], index[None, :]] = False
        return allowed


def find_duplicates(cosine: torch.Tensor, norms: torch.Tensor, *, fresh: list[bool],
                    min_cosine: float = 0.99, norm_tolerance: float = 0.05
                    ) -> DuplicateGroups:
    """Group inputs whose task vectors are near-identical: cosine ≥ ``min_cosine`` and
    norms within ``norm_tolerance`` of each other (relative to the larger). Pairs where
    neither input is fresh are left alone (neither is shared this round); groups are the
    connected components of the remaining pairs.

    A scaled copy (same direction, another norm) is not a duplicate: the norm guard
    deals with norms.
    """
    cos = cosine.to(torch.float64)
    n = norms.to(torch.float64)
    k = cos.shape[0]
    parent = list(range(k))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(k):
        for j in range(i + 1, k):
            big = max(float(n[i]), float(n[j]))
            if (fresh[i] or fresh[j]) and float(n[i]) > 0 and float(n[j]) > 0 \
                    and float(cos[i, j]) >= min_cosine \
                    and abs(float(n[i]) - float(n[j])) <= norm_tolerance * big:
                parent[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in range(k):
        members.setdefault(root(i), []).append(i)
    groups = sorted(g for g in members.values() if len(g) > 1)
    kept = [next((i for i in g if not fresh[i]), g[0]) for g in groups]
    cosines = [min(float(cos[i, j]) for i in g for j in g if i < j) for g in groups]
    ratios = [float(n[g].max() / n[g].min()) for g in groups]
    return DuplicateGroups(groups, kept, cosines, ratios)


def bound_weights(weights: torch.Tensor, contributes: torch.Tensor, *,
                  max_peer_weight: float | None = None,
                  min_contributors: int | None = None) -> torch.Tensor:
    """Cap what any one peer can weigh in a row, and keep only self in a row that mixes
    too few contributors for any one of them to stay hidden.

    Args:
        weights: K×K row-stochastic weights (row i: target i; column j: peer j).
        contributes: K bools, whose update enters this round (fresh, not blocked).
        max_peer_weight: any peer's weight above it is cut to it; the excess goes to the
            row's self weight (what the target already has: the bound never moves it
            toward anyone else).
        min_contributors: a row whose contributors (self, plus every peer with weight
            and an update) number fewer than this becomes self only: with one peer, that
            peer's update is solvable from the target's adapter and the published weights
            (τ_peer = (merged − latest − p_self·τ_self) / p_peer).

    Returns:
        The bounded K×K weights (rows still sum to what they summed to).
    """
    out = weights.to(torch.float64).clone()
    k = out.shape[0]
    for i in range(k):
        peers = [j for j in range(k) if j != i and float(out[i, j]) > 0 and bool(contributes[j])]
        if min_contributors is not None and 1 + len(peers) < min_contributors:
            total = float(out[i].sum())
            out[i] = 0.0
            out[i, i] = total
            continue
        if max_peer_weight is not None:
            for j in range(k):
                if j != i and float(out[i, j]) > max_peer_weight:
                    out[i, i] += out[i, j] - max_peer_weight
                    out[i, j] = max_peer_weight
    return out


def describe_duplicates(groups: DuplicateGroups, names: list[str]) -> list[dict[str, Any]]:
    """The round record's ``duplicates`` entry: one object per set of copies."""
    return [{"members": [names[i] for i in group], "kept": names[kept],
             "cosine": round(cos, 6), "norm_ratio": round(ratio, 6),
             "action": f"counted once: only {names[kept]}'s update is weighted (as if "
                       "uploaded alone); the others are shared with no one this round, "
                       "and no member of the set draws on another"}
            for group, kept, cos, ratio in zip(groups.groups, groups.kept, groups.cosine,
                                               groups.norm_ratio, strict=True)]
