"""Turn cosines into personalized aggregation weights.

Each rule maps one client's row of cosines to weights over the peers it may draw from
(the self term always included). Rules are registered by name; merge methods (FedBip,
FedAvg, …) are declared in ``fedbip_hub.engine.strategies``.

The default, the **evidence rule** (``fedbip_hub.engine.evidence``, where its maths is
documented), weighs a peer by how far its cosine stands out from the background that
unrelated clients show, not by its rank within the row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedbip_hub.engine.evidence import background_of, evidence_weights

RuleName = Literal["evidence", "normalize", "softmax", "zscore"]


@dataclass(frozen=True)
class WeightOptions:
    """How cosines become weights.

    Attributes:
        rule: "normalize" is the paper's p_ik = c_ik/Σ_j c_ij; "softmax" uses exp(c/T);
            "zscore" gives self a fixed share and splits the rest by row-standardised
            cosines (clipped at 0).
        clip_negative: conflicting peers (c < 0) weigh nothing instead of being subtracted.
        temperature: T of the softmax rule.
        top_k: keep only the k most similar peers (self always kept).
        self_floor: the self weight is raised to at least this.
        self_share: the self weight of the zscore rule.
        evidence_low, evidence_high: the evidence rule's ramp, in robust standard
            deviations above the background (see ``evidence_credibility``).
        evidence_min_pairs: from this many client pairs on, the background and the noise
            are estimated from the matrix; below it, the priors are used.
        evidence_prior_background, evidence_prior_spread: the background cosine and its
            noise assumed with too few pairs (K=2); evidence_spread_floor: the least noise.
        evidence_ramp_peers: the number of peers the ramp is meant for: a row with more
            shifts it up to draw no more credibility from unrelated peers by chance
            (``evidence.ramp_shift``). None: the ramp is fixed.
    """

    rule: RuleName = "normalize"
    clip_negative: bool = True
    temperature: float = 0.1
    top_k: int | None = None
    self_floor: float | None = None
    self_share: float = 0.5
    evidence_low: float = 1.0
    evidence_high: float = 3.0
    evidence_min_pairs: int = 3
    evidence_prior_background: float = 0.0
    evidence_prior_spread: float = 0.1
    evidence_spread_floor: float = 0.05
    evidence_ramp_peers: int | None = None


RowRule = Callable[[torch.Tensor, int, torch.Tensor, WeightOptions], torch.Tensor]
_RULES: dict[str, RowRule] = {}


def register_rule(name: str) -> Callable[[RowRule], RowRule]:
    def decorate(fn: RowRule) -> RowRule:
        _RULES[name] = fn
        return fn
    return decorate


def rule_names() -> list[str]:
    return sorted(_RULES)


def _self_only(row: torch.Tensor, i: int) -> torch.Tensor:
    out = torch.zeros_like(row)
    out[i] = 1.0
    return out


@register_rule("normalize")
def _normalize(row: torch.Tensor, i: int, mask: torch.Tensor, opts: WeightOptions
               ) -> torch.Tensor:
    scores = row.clamp_min(0) if opts.clip_negative else row.clone()
    scores = torch.where(mask, scores, torch.zeros_like(scores))
    total = scores.sum()
    return scores / total if total > 1e-12 else _self_only(row, i)


@register_rule("softmax")
def _softmax(row: torch.Tensor, i: int, mask: torch.Tensor, opts: WeightOptions
             ) -> torch.Tensor:
    peers = mask.clone()
    peers[i] = False
    if not bool((row[peers] != 0).any()):
        # no similarity evidence at all (an all-zero task vector has cosine 0 with everyone):
        # keep only the self weight, as the other rules do (ALGORITHM §3, degenerate rows)
        return _self_only(row, i)
    keep = mask & (row >= 0) if opts.clip_negative else mask.clone()
    keep[i] = True
    logits = torch.where(keep, row / opts.temperature, torch.full_like(row, float("-inf")))
    return torch.softmax(logits, dim=0)


@register_rule("zscore")
def _zscore(row: torch.Tensor, i: int, mask: torch.Tensor, opts: WeightOptions
            ) -> torch.Tensor:
    peers = mask.clone()
    peers[i] = False
    out = _self_only(row, i)
    if peers.sum() == 0:
        return out
    values = row[peers]
    if opts.clip_negative:
        # Clip first, then standardise: a strongly conflicting peer must weigh nothing,
        # not drag the row's mean down and lift other-task peers above it.
        values = values.clamp_min(0)
    spread = values.std(unbiased=False) if values.numel() > 1 else values.new_tensor(0.0)
    z = (values - values.mean()) / spread if spread > 1e-12 else values.clone()
    if opts.clip_negative:
        z = torch.where(values > 0, z, torch.zeros_like(z))
    z = z.clamp_min(0)
    if z.sum() <= 1e-12:
        return out
    out[peers] = (1.0 - opts.self_share) * z / z.sum()
    out[i] = opts.self_share
    return out


def _top_k_mask(row: torch.Tensor, i: int, mask: torch.Tensor, k: int) -> torch.Tensor:
    peer_scores = torch.where(mask, row, torch.full_like(row, float("-inf")))
    peer_scores[i] = float("-inf")
    n_peers = int(mask.sum()) - int(mask[i])
    keep = torch.zeros_like(mask)
    if k > 0 and n_peers > 0:
        keep[torch.topk(peer_scores, min(k, n_peers)).indices] = True
    keep[i] = True
    return keep


def _apply_self_floor(weights: torch.Tensor, i: int, floor: float) -> torch.Tensor:
    if weights[i] >= floor:
        return weights
    peers = weights.clone()
    peers[i] = 0
    rest = peers.sum()
    out = peers * ((1.0 - floor) / rest) if rest > 0 else peers
    out[i] = floor if rest > 0 else 1.0
    return out


def similarity_weights(cos: torch.Tensor, opts: WeightOptions,
                       allowed: torch.Tensor | None = None, *,
                       cap: torch.Tensor | None = None,
                       population: torch.Tensor | None = None) -> torch.Tensor:
    """Row-stochastic K×K weights from a K×K cosine matrix.

    Args:
        cos: cosines; the diagonal is taken as 1 whatever it holds.
        opts: the rule and its options.
        allowed: K×K bool, which peers row i may draw from (the diagonal is forced on).
        cap: the evidence rule only: K×K bounds on each pair's credibility.
        population: the evidence rule only: K bools, the clients whose pairs make up the
            background (default: all).
    """
    k = cos.shape[0]
    cos = cos.to(torch.float64).clone()
    cos.fill_diagonal_(1.0)
    allowed = _with_diagonal(allowed, k)
    if opts.rule == "evidence":
        # the background is the whole matrix's (before top-k), so all rows go at once
        background = background_of(cos, population, opts)
        if opts.top_k is not None and k:
            allowed = torch.stack([_top_k_mask(cos[i], i, allowed[i], opts.top_k)
                                   for i in range(k)])
        matrix = evidence_weights(cos, opts, allowed, background, cap)
        if opts.self_floor is not None:
            matrix = torch.stack([_apply_self_floor(matrix[i], i, opts.self_floor)
                                  for i in range(k)]) if k else matrix
        return matrix
    rule = _RULES[opts.rule]
    rows = []
    for i in range(k):
        mask = allowed[i]
        if opts.top_k is not None:
            mask = _top_k_mask(cos[i], i, mask, opts.top_k)
        weights = rule(cos[i], i, mask, opts)
        if opts.self_floor is not None:
            weights = _apply_self_floor(weights, i, opts.self_floor)
        rows.append(weights)
    return torch.stack(rows)


def _with_diagonal(allowed: torch.Tensor | None, k: int) -> torch.Tensor:
    mask = torch.ones(k, k, dtype=torch.bool) if allowed is None else allowed.clone().bool()
    mask.fill_diagonal_(True)
    return mask


def size_weights(n_examples: Sequence[float], allowed: torch.Tensor | None = None, *,
                 max_share: float | None = None) -> torch.Tensor:
    """FedAvg weights p_ik = n_k / Σ_j n_j over the allowed peers (the same for every row).

    Counts of any size are safe: past 2^53 they are divided by the largest first (Python's
    exact integer division), so nothing overflows a float.

    Args:
        n_examples: per-client data sizes, finite and non-negative (negative counts as 0).
        allowed: K×K bool, which peers row i may draw from (the diagonal is forced on).
        max_share: cap c on any one peer's weight in a row, by water-filling:
            p_ik = min(c', λ_i·n_k) with λ_i making the row sum to 1, where c' =
            max(c, 1/m) for the m allowed peers with data (no weighting of m peers can
            give each less than 1/m).
    """
    values = [_size(x) for x in n_examples]
    top = max(values, default=0)
    exact = top <= 2**53  # as floats, exactly; else as ratios to the largest
    n = torch.tensor([float(x) if exact else x / top for x in values], dtype=torch.float64)
    mask = _with_diagonal(allowed, n.numel())
    scores = torch.where(mask, n.expand(n.numel(), -1), torch.zeros(1, dtype=torch.float64))
    totals = scores.sum(dim=1, keepdim=True)
    uniform = mask.to(torch.float64) / mask.sum(dim=1, keepdim=True)
    weights = torch.where(totals > 0, scores / totals.clamp_min(1e-300), uniform)
    if max_share is None:
        return weights
    return torch.stack([_water_fill(row, scores[i], max_share) if totals[i] > 0 else row
                        for i, row in enumerate(weights)])


def _size(value: float) -> float | int:
    if isinstance(value, int):
        return max(value, 0)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"n_examples must be finite, got {value}")
    return max(value, 0.0)


def _water_fill(weights: torch.Tensor, scores: torch.Tensor, cap: float) -> torch.Tensor:
    """Cap each weight at ``cap`` (raised to 1/m for m positive scores), handing the excess
    to the uncapped peers in proportion to their scores, until none is over."""
    cap = max(cap, 1.0 / int((scores > 0).sum()))
    capped = torch.zeros_like(weights, dtype=torch.bool)
    while True:
        over = (weights > cap) & ~capped
        if not bool(over.any()):
            return weights
        capped |= over
        free_total = scores[~capped].sum()
        rest = max(1.0 - cap * int(capped.sum()), 0.0)
        share = scores * (rest / free_total) if free_total > 0 else torch.zeros_like(scores)
        weights = torch.where(capped, torch.full_like(weights, cap), share)


def uniform_weights(k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """p_ik = 1/|allowed_i| (the paper's uniform ablation)."""
    mask = _with_diagonal(allowed, k).to(torch.float64)
    return mask / mask.sum(dim=1, keepdim=True)


def local_weights(k: int) -> torch.Tensor:
    """p_ii = 1: every client keeps only its own update."""
    return torch.eye(k, dtype=torch.float64)


def group_weights(groups: Sequence[str], allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: uniform within each client's true task group (benchmarks only)."""
    k = len(groups)
    same = torch.tensor([[a == b for b in groups] for a in groups], dtype=torch.bool)
    return uniform_weights(k, _with_diagonal(allowed, k) & same)
