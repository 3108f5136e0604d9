"""The weights stage: who may share with whom this round (fresh updates only, copies as
one, sign flippers with no one), the strategy's weight matrices under its bounds, each
input's contribution (staleness discount × norm-guard scale), and the targets whose
adapter the merge changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedbip_hub.engine.robust import DuplicateGroups, bound_weights
from fedbip_hub.engine.similarity import CosineSource
from fedbip_hub.engine.strategies import Strategy, WeightTable, compute_weights, oracle_groups
from fedbip_hub.server.plan import PinnedInput, RoundPlan


@dataclass(frozen=True)
class Weighed:
    """The weights, each input's contribution, and the inputs the merge changes."""

    weights: WeightTable
    contribution: torch.Tensor
    targets: list[int]


def staleness_discount(staleness: int, beta: float) -> float:
    """σ(a) = (1 + a)^(−β), FedAsync's polynomial discount."""
    return float((1.0 + staleness) ** (-beta))


def weigh(plan: RoundPlan, strategy: Strategy, inputs: list[PinnedInput],
          cosines: CosineSource, scale: torch.Tensor, blocked: list[int],
          copies: DuplicateGroups | None = None, *,
          groups: Mapping[str, str] | None = None, remerge: bool = False) -> Weighed:
    """The weights over ``inputs`` and the targets they change (see ``changed_targets``);
    ``groups`` are the oracle's true task groups (benchmarks only). ``remerge`` (the
    merge settings changed since the last round) makes every input a target: an adapter
    no fresh update reaches is still one the old settings built."""
    k = len(inputs)
    fresh = torch.tensor([p.fresh for p in inputs], dtype=torch.bool)
    fresh[blocked] = False  # the weighting forces the diagonal back on: self is kept
    allowed = fresh[None, :].expand(k, k).clone()
    if copies is not None:  # copies weigh as one upload (robust.DuplicateGroups.mask)
        allowed &= copies.mask(k)
    oracle = (oracle_groups(strategy, [p.client for p in inputs], groups)
              if strategy.spec.weighting == "oracle" else None)
    population = torch.ones(k, dtype=torch.bool)
    population[blocked] = False
    if copies is not None:
        population[copies.dropped] = False
    weights = compute_weights(strategy, k=k, report=cosines,
                              n_examples=[p.n_examples for p in inputs], allowed=allowed,
                              groups=oracle, population=population)
    contribution = torch.tensor(
        [staleness_discount(p.staleness, strategy.staleness_beta) if p.fresh else 0.0
         for p in inputs], dtype=torch.float64) * scale
    weights = _bounded(weights, strategy, fresh & (contribution > 0))
    targets = (list(range(k)) if remerge else
               changed_targets(weights, contribution,
                               [plan.latest.get(p.client) is not None for p in inputs]))
    return Weighed(weights, contribution, targets)


def changed_targets(weights: WeightTable, contribution: torch.Tensor,
                    has_adapter: list[bool]) -> list[int]:
    """The inputs whose personalized adapter this round's merge changes: some fresh
    update enters it (a nonzero weight on a nonzero contribution, in any weight matrix,
    its own update included, which personal heads always take), or it has no
    personalized adapter yet. Any other's merge is its latest adapter plus nothing: it is
    left as it is, byte for byte, and not republished."""
    live = contribution != 0
    matrices = [*weights.matrices.values(),
                *([weights.fallback] if weights.fallback is not None else [])]
    return [i for i in range(len(has_adapter))
            if not has_adapter[i] or bool(live[i])
            or any(bool((m[i][live] != 0).any()) for m in matrices)]


def _bounded(weights: WeightTable, strategy: Strategy, contributes: torch.Tensor
             ) -> WeightTable:
    """``weights`` under the strategy's max_peer_weight and min_contributors (unchanged,
    the same tensors, when neither is set)."""
    if strategy.max_peer_weight is None and strategy.min_contributors is None:
        return weights

    def bound(matrix: torch.Tensor) -> torch.Tensor:
        return bound_weights(matrix, contributes, max_peer_weight=strategy.max_peer_weight,
                             min_contributors=strategy.min_contributors)

    return WeightTable(weights.granularity, {key: bound(m) for key, m in
                                             weights.matrices.items()},
                       bound(weights.fallback) if weights.fallback is not None else None)
