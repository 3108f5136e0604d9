"""The evidence rule (weighting.evidence_weights) against weights computed by hand."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from fedbip_hub.engine.strategies import Strategy, compute_weights
from fedbip_hub.engine.weighting import WeightOptions, background_of, similarity_weights

OPTS = WeightOptions(rule="evidence", evidence_low=1.0, evidence_high=3.0,
                     evidence_min_pairs=3, evidence_prior_background=0.0,
                     evidence_prior_spread=0.1, evidence_spread_floor=0.05)


def sym(k: int, pairs: dict[tuple[int, int], float]) -> torch.Tensor:
    c = torch.eye(k, dtype=torch.float64)
    for (i, j), v in pairs.items():
        c[i, j] = c[j, i] = v
    return c


def by_hand(c: torch.Tensor, level: float, spread: float, opts: WeightOptions = OPTS
            ) -> torch.Tensor:
    """w_ik = q_ik / (1 + Σ q), q = clip((z − low) / (high − low)), z = (c − level)/spread."""
    k = c.shape[0]
    out = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        q = [1.0 if j == i else min(1.0, max(0.0, ((float(c[i, j]) - level) / spread
                                                     - opts.evidence_low)
                                             / (opts.evidence_high - opts.evidence_low)))
             for j in range(k)]
        for j in range(k):
            out[i, j] = q[j] / sum(q)
    return out


@pytest.mark.parametrize(("cosine", "peer_weight"), [
    (0.30, 0.5),          # z = 3: a full peer, weighed like self
    (0.20, 1 / 3),        # z = 2: q = 1/2 → 0.5 / 1.5
    (0.15, 0.2),          # z = 1.5: q = 1/4 → 0.25 / 1.25
    (0.08, 0.0),          # z = 0.8: below the ramp
    (-0.015, 0.0),        # the K=2 federation: the client keeps its own update
])
def test_two_clients_use_the_priors(cosine: float, peer_weight: float) -> None:
    c = sym(2, {(0, 1): cosine})
    w = similarity_weights(c, OPTS)
    expected = torch.tensor([[1 - peer_weight, peer_weight], [peer_weight, 1 - peer_weight]],
                            dtype=torch.float64)
    torch.testing.assert_close(w, expected)
    assert not background_of(c, None, OPTS).estimated


def test_three_clients_a_pair_and_a_singleton() -> None:
    # pairs 0.40 (same task), 0.06 and 0.02 (unrelated): median 0.06; below it, 0.04
    c = sym(3, {(0, 1): 0.40, (0, 2): 0.06, (1, 2): 0.02})
    level, spread = 0.06, 1.4826 * 0.04
    w = similarity_weights(c, OPTS)
    torch.testing.assert_close(w, by_hand(c, level, spread))
    # the pair shares fully, the singleton keeps its own update
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(w[2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_background_is_the_median_and_the_lower_semi_mad_with_a_floor() -> None:
    gen = torch.Generator().manual_seed(0)
    k = 7
    raw = torch.rand(k, k, generator=gen, dtype=torch.float64) * 0.6 - 0.1
    c = (raw + raw.T) / 2
    c.fill_diagonal_(1.0)
    values = sorted(float(c[i, j]) for i, j in itertools.combinations(range(k), 2))
    med = statistics.median_low(values)  # torch's median is the lower one
    below = [med - v for v in values if v < med]
    bg = background_of(c, None, OPTS)
    assert bg.estimated
    assert bg.level == pytest.approx(med)
    assert bg.spread == pytest.approx(max(1.4826 * statistics.median_low(below), 0.05))
    torch.testing.assert_close(similarity_weights(c, OPTS), by_hand(c, bg.level, bg.spread))


def test_same_task_pairs_do_not_inflate_the_noise() -> None:
    # 9 unrelated pairs within ±0.01 of 0.05, and 6 same-task pairs far above
    k = 6
    c = torch.eye(k, dtype=torch.float64)
    pairs = list(itertools.combinations(range(k), 2))
    for n, (i, j) in enumerate(pairs):
        c[i, j] = c[j, i] = 0.6 if n < 6 else 0.05 + 0.01 * ((n % 3) - 1)
    bg = background_of(c, None,
                       WeightOptions(rule="evidence", evidence_spread_floor=1e-6))
    assert bg.spread == pytest.approx(1.4826 * 0.01)


def test_a_positive_background_is_not_evidence() -> None:
    # Cross-group cosines are positive (+0.09, the MiniLM round), same-group ones
    # stand well above them. Four groups of three.
    groups = [g for g in range(4) for _ in range(3)]
    k = len(groups)
    c = torch.full((k, k), 0.09, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    c += (torch.rand(k, k, generator=gen, dtype=torch.float64) - 0.5) * 0.04
    c = (c + c.T) / 2
    for i, j in itertools.product(range(k), repeat=2):
        if groups[i] == groups[j]:
            c[i, j] = 0.30
    c.fill_diagonal_(1.0)
    w = similarity_weights(c, OPTS)
    same = torch.tensor([[a == b for b in groups] for a in groups])
    cross_mass = (w * ~same).sum(dim=1)
    assert float(cross_mass.max()) == 0.0
    # every same-group peer is conclusive here: the oracle's 1/3 each
    torch.testing.assert_close(w, same.double() / 3)
    # the paper's normalisation hands the nine weakly similar peers a third of the weight
    paper = similarity_weights(c, WeightOptions(rule="normalize"))
    assert float((paper * ~same).sum(dim=1).mean()) > 0.3  # 0.81 / 2.41 by hand


def test_allowed_peers_and_top_k_and_self_floor() -> None:
    c = sym(4, {(0, 1): 0.5, (0, 2): 0.5, (0, 3): 0.0, (1, 2): 0.0, (1, 3): 0.0,
                (2, 3): 0.0})
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[0, 2] = False
    w = similarity_weights(c, OPTS, allowed)
    assert w[0, 2] == 0 and w[0, 1] == pytest.approx(0.5)
    top1 = similarity_weights(c, WeightOptions(**{**OPTS.__dict__, "top_k": 1}))
    assert int((top1[0, 1:] > 0).sum()) == 1
    floored = similarity_weights(c, WeightOptions(**{**OPTS.__dict__, "self_floor": 0.6}))
    assert floored[0, 0] == pytest.approx(0.6) and floored[0].sum() == pytest.approx(1.0)


def test_zero_task_vector_keeps_only_itself() -> None:
    c = sym(3, {(0, 1): 0.0, (0, 2): 0.0, (1, 2): 0.5})
    w = similarity_weights(c, OPTS)
    torch.testing.assert_close(w[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


class _Cosines:
    def __init__(self, model: torch.Tensor, layers: dict[str, torch.Tensor]):
        self._model, self._layers = model, layers

    def cosines(self, granularity: str) -> dict[str, torch.Tensor]:
        return {"model": self._model} if granularity == "model" else self._layers

    def model_cosine(self) -> torch.Tensor:
        return self._model


def test_evidence_layer_shrinkage_mixes_in_the_model_cosine() -> None:
    model = sym(2, {(0, 1): 0.8})
    layer = sym(2, {(0, 1): 0.0})
    strategy = Strategy(method="fedbip-l", rule="evidence", evidence_layer_shrinkage=0.25,
                        evidence_model_gate=False)
    table = compute_weights(strategy, k=2, report=_Cosines(model, {"layers.0": layer}))
    # 0.25·0.8 + 0.75·0.0 = 0.2 → z = 2 → q = 1/2 → peer 1/3
    torch.testing.assert_close(table.matrices["layers.0"],
                               similarity_weights(sym(2, {(0, 1): 0.2}), OPTS))
    assert float(table.matrices["layers.0"][0, 1]) == pytest.approx(1 / 3)


def test_ramp_must_rise() -> None:
    with pytest.raises(ValueError, match="evidence_high"):
        Strategy(rule="evidence", evidence_low=2.0, evidence_high=2.0)


def test_a_layer_needs_evidence_at_the_model_level_too() -> None:
    # layer 0 says clients 0 and 1 share a task; the model level says they do not
    model = sym(2, {(0, 1): 0.0})
    layer = sym(2, {(0, 1): 0.9})
    gated = compute_weights(Strategy(method="fedbip-l", rule="evidence"), k=2,
                            report=_Cosines(model, {"layers.0": layer}))
    torch.testing.assert_close(gated.matrices["layers.0"], torch.eye(2, dtype=torch.float64))
    free = compute_weights(Strategy(method="fedbip-l", rule="evidence",
                                    evidence_model_gate=False), k=2,
                           report=_Cosines(model, {"layers.0": layer}))
    assert float(free.matrices["layers.0"][0, 1]) == pytest.approx(0.5)
    # partial model-level evidence caps the layer's: model 0.2 → q = 1/2 → peer 1/3
    half = compute_weights(Strategy(method="fedbip-l", rule="evidence"), k=2,
                           report=_Cosines(sym(2, {(0, 1): 0.2}), {"layers.0": layer}))
    assert float(half.matrices["layers.0"][0, 1]) == pytest.approx(1 / 3)


def test_clients_outside_the_population_do_not_move_the_background() -> None:
    # clients 0–3 unrelated (cosines ≈ 0.05); clients 4 and 5 are copies aimed at all of
    # them (0.3 with everyone): counted, their nine pairs would lift the median to 0.3
    k = 6
    c = torch.full((k, k), 0.05, dtype=torch.float64)
    c[0, 1] = c[1, 0] = 0.04
    c[2, 3] = c[3, 2] = 0.06
    c[4:, :] = c[:, 4:] = 0.3
    c[4, 5] = c[5, 4] = 1.0
    c.fill_diagonal_(1.0)
    population = torch.tensor([True, True, True, True, False, False])
    bg = background_of(c, population, OPTS)
    alone = background_of(c[:4, :4], None, OPTS)
    assert (bg.level, bg.spread) == (alone.level, alone.spread)
    assert background_of(c, None, OPTS).level == pytest.approx(0.3)
    w = similarity_weights(c, OPTS, population=population)
    assert float(w[:4, 4:].sum()) > 0  # the copies stand out from the honest background
    torch.testing.assert_close(w[:4, :4] / w[:4, :4].sum(dim=1, keepdim=True),
                               similarity_weights(c[:4, :4], OPTS))
