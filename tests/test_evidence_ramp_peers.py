"""The evidence ramp's shift with the number of peers (``evidence_ramp_peers``): the
chance credibility of an unrelated peer against numerical integration, the shift that
holds a row's chance mass, and the weights it gives, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedbip_hub.engine.evidence import (
    Background,
    chance_credibility,
    evidence_credibility,
    ramp_shift,
)
from fedbip_hub.engine.strategies import Strategy, compute_weights
from fedbip_hub.engine.weighting import WeightOptions


def integrated(low: float, high: float, steps: int = 200_000) -> float:
    """E[clip((z − a)/(b − a), 0, 1)] for z ~ N(0, 1), by the midpoint rule on [−12, 12]."""
    width = 24.0 / steps
    total = 0.0
    for i in range(steps):
        z = -12.0 + (i + 0.5) * width
        q = min(max((z - low) / (high - low), 0.0), 1.0)
        total += q * math.exp(-0.5 * z * z) * width
    return total / math.sqrt(2.0 * math.pi)


@pytest.mark.parametrize(("low", "high"), [(1.0, 3.0), (0.0, 1.0), (2.5, 4.0), (-1.0, 0.5)])
def test_chance_credibility_is_the_expected_ramp_under_the_noise(low: float, high: float
                                                                 ) -> None:
    assert chance_credibility(low, high) == pytest.approx(integrated(low, high), rel=1e-6)


@pytest.mark.parametrize(("low", "high"), [(1.0, 3.0), (1.0, 2.0)])
@pytest.mark.parametrize("peers", [11, 23, 63, 255])
def test_the_shift_holds_the_rows_chance_mass(peers: int, low: float, high: float) -> None:
    shift = ramp_shift(peers, low, high, 9)
    target = 9 * chance_credibility(low, high)
    assert peers * chance_credibility(low + shift, high + shift) == pytest.approx(
        target, rel=1e-9)
    # the least such shift: a little less lets more chance mass in
    assert peers * chance_credibility(low + shift * 0.99, high + shift * 0.99) > target


def test_the_shift_grows_with_the_peers_and_none_turns_it_off() -> None:
    shifts = [ramp_shift(p, 1.0, 3.0, 9) for p in (1, 5, 9, 11, 23, 63, 255)]
    assert shifts[:3] == [0.0, 0.0, 0.0]  # up to the reference: the ramp as configured
    assert shifts == sorted(shifts) and 0.05 < shifts[3] < shifts[4] and shifts[-1] > 1.0
    assert ramp_shift(255, 1.0, 3.0, None) == 0.0


def test_credibility_by_hand_with_a_shifted_ramp() -> None:
    k = 24
    cos = torch.zeros(k, k, dtype=torch.float64)
    cos[0, 1] = cos[1, 0] = 0.30  # z = 3 above a background at 0 ± 0.1
    cos[0, 2] = cos[2, 0] = 0.20  # z = 2
    opts = WeightOptions(rule="evidence", evidence_ramp_peers=9)
    background = Background(0.0, 0.1, estimated=True)
    q = evidence_credibility(cos, background, opts)
    s = ramp_shift(k - 1, 1.0, 3.0, 9)
    assert q[0, 1] == pytest.approx((3.0 - 1.0 - s) / 2.0)
    assert q[0, 2] == pytest.approx((2.0 - 1.0 - s) / 2.0)
    fixed = evidence_credibility(cos, background, WeightOptions(rule="evidence"))
    assert fixed[0, 1] == pytest.approx(1.0) and fixed[0, 2] == pytest.approx(0.5)
    # the priors (too few pairs to estimate the background) are never shifted
    prior = Background(0.0, 0.1, estimated=False)
    assert torch.equal(evidence_credibility(cos, prior, opts),
                       evidence_credibility(cos, prior, WeightOptions(rule="evidence")))


def test_a_large_federation_of_unrelated_clients_keeps_more_at_home() -> None:
    """K = 24 unrelated clients (random directions): the chance credibility of a row
    falls toward the target mass, so the self share rises."""
    torch.manual_seed(0)
    k, d = 24, 400
    tau = torch.randn(k, d, dtype=torch.float64)
    u = tau / tau.norm(dim=1, keepdim=True)
    from fedbip_hub.engine.similarity import SimilarityReport

    report = SimilarityReport([f"c{i}" for i in range(k)], {"layers.0.q": u @ u.T})
    selves = {}
    for label, peers in (("fixed", None), ("shifted", 9)):
        table = compute_weights(Strategy(method="fedbip", evidence_ramp_peers=peers), k=k,
                                report=report)
        selves[label] = float(next(iter(table.matrices.values())).diagonal().mean())
    assert selves["shifted"] > selves["fixed"]
    # what the shift promises: about 1/(1 + 9·E[q]) = 0.73 on average, as at K = 10
    assert selves["shifted"] > 0.65
