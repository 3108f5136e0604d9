"""The evidence rule: how far a peer's cosine stands out from the background.

The default weighting (registered as ``evidence`` in ``fedbip_hub.engine.weighting``) weighs a
peer by how far its cosine stands out from the background that unrelated clients show,
not by its rank within the row:

* background: over the K(K−1)/2 client pairs of the matrix, the level b is the median
  cosine and the noise σ the lower semi-MAD, 1.4826·median(b − c) over pairs below b,
  floored at ``evidence_spread_floor``. Same-task pairs are a minority above the median,
  so neither is pulled up by them. With fewer than ``evidence_min_pairs`` pairs (K = 2)
  the priors b₀ = ``evidence_prior_background`` and σ₀ = ``evidence_prior_spread`` stand in;
* evidence z_ik = (c_ik − b)/σ, and credibility q_ik = clip((z_ik − z_lo)/(z_hi − z_lo), 0, 1)
  with z_lo = ``evidence_low`` (1) and z_hi = ``evidence_high`` (3), both raised by s
  (``ramp_shift``) when a row has more than ``evidence_ramp_peers`` (9) peers: the least
  s with (K − 1)·E[q](z_lo + s, z_hi + s) ≤ 9·E[q](z_lo, z_hi) for z ~ N(0, 1), so the
  credibility unrelated peers lend a row by chance does not grow with K;
* weights w_ik = q_ik / (1 + Σ_j q_ij) and w_ii = 1 / (1 + Σ_j q_ij): a conclusive peer weighs
  as much as the client's own update (m of them give the oracle's 1/(m+1)), a peer inside
  the background's noise gets nothing, and the self share grows as the evidence weakens.

On a real pretrained encoder every client's update shares a component (the head, the
common input distribution), so cross-task cosines are positive; rules that rank within a
row (``zscore``, the paper's ``normalize``) turn that background into weight.

Centring (``Strategy.evidence_centre``, default "unit", from ``evidence_centre_min_clients``
= 4 clients on): the cosines above are taken between centred task vectors, exactly from
the cosine matrix (``centred_cosine``). "unit" centres the directions u_i = τ_i/‖τ_i‖: with
G = cos (the Gram of the u_i), p the background's population (copies and held-back
updates left out, so they cannot move the mean) and C = I − 1pᵀ/|P|, the centred Gram is
G̃ = C·G·Cᵀ, the Gram of u_i − ū, and c̃_ik = G̃_ik/√(G̃_ii·G̃_kk). "gram" centres τ_i
themselves, G = diag(n)·cos·diag(n) with n the norms (of the round, or the similarity
memory's √Σγ^age‖τ_i‖²); one large update then moves the mean for everyone. Subtracting
the mean removes the component every update shares, but when one large group dominates
it, two small groups that both differ from it come out alike; with
``evidence_centre_raw_gate`` a pair's credibility is therefore capped by its credibility
in the raw model-level cosines: q_ik = min(q̃_ik, q_ik^raw). Below 4 clients the raw
cosines are used: two centred vectors are exactly opposite, and three are bound to sum
to zero.

Per layer (FedBip-L) the cosines are shrunk toward the model level,
λ·c_model + (1−λ)·c_layer (``evidence_layer_shrinkage``), and a layer's credibility is
capped by the model level's (``evidence_model_gate``): a peer needs evidence in the layer
and overall.

Round gate (``evidence_round_gate``): the weights read the similarity memory, whose sums
over rounds keep the first round's cosines, the noisiest (every client steps from the
same initial adapter with a few examples), as long as any later one. A pair credible in
the memory but not in this round's own task vectors is one whose updates have stopped
agreeing, typically a client that absorbed a wrong peer and now steps back toward its own
task. So each pair's credibility is the lesser of the two, computed alike (centring,
shrinkage, model gate) on the memory's cosines and on this round's:
q_ik = min(q_ik^memory, q_ik^round). It can only move weight back to self.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from fedbip_hub.engine.similarity import MODEL_KEY, Granularity

if TYPE_CHECKING:
    from fedbip_hub.engine.strategies import Strategy
    from fedbip_hub.engine.weighting import WeightOptions


class EvidenceSource(Protocol):
    def model_cosine(self) -> torch.Tensor: ...
    def cosines(self, granularity: Granularity) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Background:
    """What unrelated clients' cosines look like in one matrix: their level and spread."""

    level: float
    spread: float
    estimated: bool  # False: too few pairs, the priors were used


def background_of(cos: torch.Tensor, population: torch.Tensor | None, opts: WeightOptions
                  ) -> Background:
    """The background of a cosine matrix: what the pairs of unrelated clients show.

    Most pairs of a federation with several tasks are unrelated, so the median pair is
    one: same-task pairs are a minority that stands above it. Their noise is measured
    below the median only (the lower semi-MAD, scaled to a standard deviation), where
    same-task pairs do not inflate it; it is floored at ``evidence_spread_floor``. With
    fewer than ``evidence_min_pairs`` pairs neither can be estimated, and the priors
    (``evidence_prior_background`` and ``evidence_prior_spread``) stand in.

    ``population`` (K bools, default all) names the clients whose pairs make up the
    background: copies of another member and updates the sign guard holds back are left
    out, so they cannot move it.
    """
    k = cos.shape[0]
    members = (torch.ones(k, dtype=torch.bool) if population is None
               else population.to(torch.bool))
    pairs = torch.triu(members[:, None] & members[None, :], diagonal=1)
    values = cos[pairs]
    if values.numel() < max(1, opts.evidence_min_pairs):
        return Background(opts.evidence_prior_background,
                          max(opts.evidence_prior_spread, opts.evidence_spread_floor),
                          estimated=False)
    level = float(values.median())
    below = level - values[values < level]
    spread = 1.4826 * float(below.median()) if below.numel() else 0.0
    return Background(level, max(spread, opts.evidence_spread_floor), estimated=True)


def model_credibility(cos: torch.Tensor, opts: WeightOptions,
                      population: torch.Tensor | None = None) -> torch.Tensor:
    """The evidence rule's credibility of every pair at one level (the model's, say)."""
    cos = cos.to(torch.float64).clone()
    cos.fill_diagonal_(1.0)
    return evidence_credibility(cos, background_of(cos, population, opts), opts)


def _tail_integral(z: float) -> float:
    """G(z) = φ(z) − z·Q(z), with Q = 1 − Φ: G' = −Q, so ∫ₐᵇ Q = G(a) − G(b)."""
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) - z * tail


def chance_credibility(low: float, high: float) -> float:
    """E[q] for one unrelated peer, z ~ N(0, 1): E[clip((z − a)/(b − a), 0, 1)] =
    (1/(b − a))·∫ₐᵇ Q(z) dz = (G(a) − G(b))/(b − a)."""
    return (_tail_integral(low) - _tail_integral(high)) / max(high - low, 1e-12)


def ramp_shift(peers: int, low: float, high: float, reference_peers: int | None) -> float:
    """The least s ≥ 0 with peers·E[q] on the ramp (low + s, high + s) at most what
    ``reference_peers`` peers draw on the ramp itself, reference_peers·E[q](low, high).

    A row with K − 1 unrelated peers draws (K − 1)·E[q] credibility by chance, which
    grows with K at a fixed ramp: at K = 24 the ramp 1–3 expects about 1.0, as much as
    a conclusive peer, and the row gives a third of its weight to other tasks. Shifting
    the ramp keeps that chance mass at its level for the federation size the ramp was
    chosen on (Bonferroni-like, on the expected mass rather than the probability of any
    false peer); smaller federations keep the ramp. Bisection: E[q] falls with s.
    """
    if reference_peers is None or peers <= reference_peers:
        return 0.0
    target = reference_peers * chance_credibility(low, high)
    lo, hi = 0.0, 40.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if peers * chance_credibility(low + mid, high + mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def evidence_credibility(cos: torch.Tensor, background: Background, opts: WeightOptions
                         ) -> torch.Tensor:
    """q_ik ∈ [0, 1]: how credibly peer k shares client i's task.

    z = (c_ik − level) / spread is how many noise units the pair stands above the
    background. q ramps linearly from 0 at z = evidence_low to 1 at z = evidence_high,
    both shifted up by ``ramp_shift`` for the K − 1 peers of a row beyond
    ``evidence_ramp_peers`` (when the background was estimated from the matrix).
    """
    z = (cos - background.level) / background.spread
    shift = (ramp_shift(cos.shape[0] - 1, opts.evidence_low, opts.evidence_high,
                        opts.evidence_ramp_peers) if background.estimated else 0.0)
    width = max(opts.evidence_high - opts.evidence_low, 1e-12)
    return ((z - opts.evidence_low - shift) / width).clamp(0.0, 1.0)


def evidence_weights(cos: torch.Tensor, opts: WeightOptions, allowed: torch.Tensor,
                     background: Background | None = None,
                     cap: torch.Tensor | None = None) -> torch.Tensor:
    """The evidence rule: w_ik = q_ik / (1 + Σ_j q_ij), w_ii = 1 / (1 + Σ_j q_ij).

    A peer with conclusive evidence (q = 1) weighs as much as the client's own update, so
    a client with m such peers gets the oracle's uniform 1/(m+1); a peer whose cosine
    does not stand out from the background gets nothing; weak evidence keeps the weight
    at home. The self share follows from the evidence instead of being fixed. ``cap``
    (K×K) bounds q: a layer's weights use the model-level credibility as the cap, so a
    peer needs evidence in the layer and overall.
    """
    background = background or background_of(cos, None, opts)
    q = evidence_credibility(cos, background, opts)
    if cap is not None:
        q = torch.minimum(q, cap.to(q.dtype))
    q = torch.where(allowed, q, torch.zeros_like(q))
    q.fill_diagonal_(1.0)
    return q / q.sum(dim=1, keepdim=True)


def centred_cosine(cos: torch.Tensor, norms: torch.Tensor | None = None,
                   population: torch.Tensor | None = None) -> torch.Tensor:
    """Cosines of the centred task vectors τ_i − τ̄, from a cosine matrix alone.

    With G = diag(n)·cos·diag(n) the Gram of the task vectors (n their norms; None: unit
    vectors, each client's direction counting alike) and τ̄ the mean over ``population``
    (K bools, default all: copies and held-back updates are left out, so they cannot move
    it), C = I − 1pᵀ/|P| and the centred Gram is C·G·Cᵀ, exactly the Gram of the centred
    vectors; its cosines are returned. The
    component every update shares (the head, the common input distribution) leaves the
    cosine, so unrelated clients' background falls to about −1/(K−1). A client whose
    vector equals the mean has cosine 0 with everyone. Degenerate for K = 2 (the two
    centred vectors are opposite): callers centre from a few clients on only.
    """
    k = cos.shape[0]
    cos = cos.to(torch.float64).clone()
    cos.fill_diagonal_(1.0)
    n = (torch.ones(k, dtype=torch.float64) if norms is None
         else norms.to(torch.float64).clamp_min(0))
    gram = cos * n[:, None] * n[None, :]
    members = (torch.ones(k, dtype=torch.float64) if population is None
               else population.to(torch.float64))
    centre = torch.eye(k, dtype=torch.float64) - members[None, :] / max(float(members.sum()), 1)
    gram = centre @ gram @ centre.T
    d = gram.diagonal().clamp_min(0).sqrt()
    scale = d[:, None] * d[None, :]
    tol = 1e-12 * float(scale.max()) if k else 0.0  # a vector at the mean: no direction
    out = torch.where(scale > tol, gram / scale.clamp_min(1e-300), torch.zeros_like(gram))
    out = out.clamp(-1.0, 1.0)
    out.fill_diagonal_(1.0)
    return out


@dataclass(frozen=True)
class EvidenceInputs:
    """What the evidence rule weighs one source by: the cosines of each key (after
    centring and shrinkage) and the caps on each pair's credibility."""

    model_cos: torch.Tensor
    cosines: dict[str, torch.Tensor]
    cap: torch.Tensor | None  # per-key cap: the model level's credibility (and the raw gate)
    fallback_cap: torch.Tensor | None  # the model-level weights' cap: the raw gate


def _centred(source: EvidenceSource, mode: str, granularity: Granularity,
             model_cos: torch.Tensor, cosines: dict[str, torch.Tensor],
             population: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model-level and per-key cosines of the centred task vectors."""
    def norms(level: Granularity) -> dict[str, torch.Tensor]:
        read = getattr(source, "level_norms", None)  # a source without norms: unit
        return read(level) if mode == "gram" and read is not None else {}

    model_norms, key_norms = norms("model"), norms(granularity)
    return (centred_cosine(model_cos, model_norms.get(MODEL_KEY), population),
            {key: centred_cosine(cos, key_norms.get(key), population)
             for key, cos in cosines.items()})


def evidence_inputs(strategy: Strategy, source: EvidenceSource, granularity: Granularity,
                    k: int, population: torch.Tensor | None) -> EvidenceInputs:
    """Centring (from ``evidence_centre_min_clients`` on), per-key shrinkage toward the
    model level and the gates, for one cosine source (the memory, or this round)."""
    options = strategy.weight_options
    model_cos = source.model_cosine()
    cosines = source.cosines(granularity)
    raw_cap = None
    if strategy.evidence_centre != "off" and k >= strategy.evidence_centre_min_clients:
        if strategy.evidence_centre_raw_gate:
            raw_cap = model_credibility(model_cos, options, population)
        model_cos, cosines = _centred(source, strategy.evidence_centre, granularity,
                                      model_cos, cosines, population)
    if granularity != "model" and strategy.evidence_layer_shrinkage > 0:
        lam = strategy.evidence_layer_shrinkage
        cosines = {key: lam * model_cos.to(cos.dtype) + (1 - lam) * cos
                   for key, cos in cosines.items()}
    cap = (model_credibility(model_cos, options, population)
           if strategy.evidence_model_gate and granularity != "model" else None)
    if raw_cap is not None:  # centred evidence must also stand out in the raw cosines
        cap = raw_cap if cap is None else torch.minimum(cap, raw_cap)
    return EvidenceInputs(model_cos, cosines, cap, raw_cap)


def _capped(q: torch.Tensor, cap: torch.Tensor | None) -> torch.Tensor:
    return q if cap is None else torch.minimum(q, cap.to(q.dtype))


def _least(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return torch.minimum(a.to(torch.float64), b.to(torch.float64))


def evidence_caps(strategy: Strategy, inputs: EvidenceInputs, current: EvidenceSource,
                  granularity: Granularity, k: int, population: torch.Tensor | None
                  ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None]:
    """The round gate: every key's cap (and the model-level weights') lowered to the
    pair's full credibility in this round's own cosines, computed as for the memory."""
    options = strategy.weight_options
    now = evidence_inputs(strategy, current, granularity, k, population)
    model_q = _capped(model_credibility(now.model_cos, options, population), now.fallback_cap)
    caps: dict[str, torch.Tensor | None] = {}
    for key in inputs.cosines:
        cos = now.cosines.get(key)
        q_now = (model_q if cos is None  # a key this round lacks: its model level
                 else _capped(model_credibility(cos, options, population), now.cap))
        caps[key] = _least(inputs.cap, q_now)
    return caps, _least(inputs.fallback_cap, model_q)


def round_source(source: object) -> EvidenceSource | None:
    """This round's own cosines behind a memory view (None: the source is the round)."""
    return getattr(source, "this_round", None)

