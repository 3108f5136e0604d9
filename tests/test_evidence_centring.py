"""Centred cosines for the evidence rule (weighting.centred_cosine, evidence_centre)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from fedbip_hub.engine.evidence import centred_cosine
from fedbip_hub.engine.memory import SimilarityMemory
from fedbip_hub.engine.similarity import SimilarityReport
from fedbip_hub.engine.strategies import Strategy, compute_weights
from fedbip_hub.engine.weighting import WeightOptions, similarity_weights


def _cosine_rows(x: torch.Tensor) -> torch.Tensor:
    unit = x / x.norm(dim=1, keepdim=True)
    return unit @ unit.T


@pytest.mark.parametrize("k", [3, 4, 7])
def test_centred_cosine_is_the_cosine_of_the_centred_vectors(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(k, 11, generator=gen, dtype=torch.float64) * torch.rand(
        k, 1, generator=gen, dtype=torch.float64).add(0.2)
    cos, norms = _cosine_rows(x), x.norm(dim=1)
    # gram: each vector as it is; unit: each direction counted alike
    torch.testing.assert_close(centred_cosine(cos, norms), _cosine_rows(x - x.mean(dim=0)))
    unit = x / norms[:, None]
    torch.testing.assert_close(centred_cosine(cos), _cosine_rows(unit - unit.mean(dim=0)))


def test_the_mean_is_taken_over_the_population() -> None:
    # a copy of client 0 left out of the population does not move the mean
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    with_copy = torch.cat([x, x[:1]])
    population = torch.tensor([True] * 5 + [False])
    out = centred_cosine(_cosine_rows(with_copy), with_copy.norm(dim=1), population)
    torch.testing.assert_close(out[:5, :5], _cosine_rows(x - x.mean(dim=0)))


def test_a_shared_component_leaves_the_cosine() -> None:
    # K clients = one common direction + a private orthogonal one each: raw cosines are
    # all 0.8, the centred ones the −1/(K−1) of K vectors that sum to zero
    k = 5
    x = torch.zeros(k, k + 1, dtype=torch.float64)
    x[:, 0] = 2.0
    x[:, 1:] = torch.eye(k, dtype=torch.float64)
    cos = _cosine_rows(x)
    assert float(cos[0, 1]) == pytest.approx(0.8)
    centred = centred_cosine(cos, x.norm(dim=1))
    off = centred[~torch.eye(k, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / (k - 1)))


def test_a_vector_at_the_mean_has_no_direction() -> None:
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                       dtype=torch.float64)
    out = centred_cosine(cos, x.norm(dim=1))
    assert out[2].tolist() == [0.0, 0.0, 1.0] and out[0, 1] == -1.0


class _Source:
    """A cosine source with model-level and per-layer norms, as the memory view has."""

    def __init__(self, x: dict[str, torch.Tensor]):
        self.report = SimilarityReport([f"c{i}" for i in range(len(next(iter(x.values()))))],
                                       {k: v @ v.T for k, v in x.items()})
        self.clients = self.report.clients

    def cosines(self, granularity: str) -> dict[str, torch.Tensor]:
        return self.report.cosines(granularity)

    def model_cosine(self) -> torch.Tensor:
        return self.report.model_cosine()

    def level_norms(self, granularity: str) -> dict[str, torch.Tensor]:
        return self.report.level_norms(granularity)


def _options(strategy: Strategy) -> WeightOptions:
    return strategy.weight_options


def test_centring_weights_are_the_evidence_rule_on_centred_cosines() -> None:
    # 6 clients, two pairs and two singletons; every update shares a common component
    gen = torch.Generator().manual_seed(3)
    tasks = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    common = torch.randn(16, generator=gen, dtype=torch.float64) * 2
    x = torch.stack([common + tasks[t] + 0.3 * torch.randn(16, generator=gen,
                                                             dtype=torch.float64)
                     for t in (0, 0, 1, 1, 2, 3)])
    source = _Source({"layers.0.q": x})  # one layer, so the layer is the model
    strategy = Strategy(method="fedbip", evidence_centre="gram")
    table = compute_weights(strategy, k=6, report=source)
    expected = similarity_weights(_cosine_rows(x - x.mean(dim=0)), _options(strategy))
    torch.testing.assert_close(table.matrices["model"], expected)
    # the default centres the unit vectors: each client's direction counts alike
    default = Strategy(method="fedbip")
    assert default.evidence_centre == "unit"
    unit = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(
        compute_weights(default, k=6, report=source).matrices["model"],
        similarity_weights(_cosine_rows(unit - unit.mean(dim=0)), _options(default)))
    raw = compute_weights(Strategy(method="fedbip", evidence_centre="off"), k=6,
                          report=source)
    torch.testing.assert_close(raw.matrices["model"],
                               similarity_weights(_cosine_rows(x), _options(strategy)))


@pytest.mark.parametrize("k", [2, 3])
def test_small_federations_are_not_centred(k: int) -> None:
    # two centred vectors are always opposite; below evidence_centre_min_clients (4) the
    # raw cosines are used, K=2 with the priors: cosine 0.2 → z = 2 → q = 1/2 → peer 1/3
    x = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.9798, 0.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)[:k]
    source = _Source({"layers.0.q": x})
    centred = compute_weights(Strategy(method="fedbip", evidence_centre="gram"), k=k,
                              report=source)
    raw = compute_weights(Strategy(method="fedbip", evidence_centre="off"), k=k,
                          report=source)
    torch.testing.assert_close(centred.matrices["model"], raw.matrices["model"])
    default = compute_weights(Strategy(method="fedbip"), k=k, report=source)
    torch.testing.assert_close(default.matrices["model"], raw.matrices["model"])
    if k == 2:
        assert float(raw.matrices["model"][0, 1]) == pytest.approx(1 / 3, abs=1e-4)


def test_memory_view_norms_are_the_remembered_norms() -> None:
    gen = torch.Generator().manual_seed(5)
    modules = ("model.layers.0.q_proj", "model.layers.1.q_proj")
    memory = SimilarityMemory(granularity="layer")
    sums = torch.zeros(3, 2, dtype=torch.float64)
    for _ in range(2):
        x = {m: torch.randn(3, 5, generator=gen, dtype=torch.float64) for m in modules}
        report = SimilarityReport(["a", "b", "c"], {m: v @ v.T for m, v in x.items()})
        memory = memory.updated(report, [True] * 3, decay=1.0)
        sums += torch.stack([x[m].pow(2).sum(dim=1) for m in modules], dim=1)
    view = memory.view(report)
    torch.testing.assert_close(view.level_norms("layer")["model.layers.0"], sums[:, 0].sqrt())
    torch.testing.assert_close(view.level_norms("model")["model"], sums.sum(dim=1).sqrt())


def _by_hand(x: torch.Tensor, *, low: float, high: float, raw_gate: bool,
             unit: bool = False) -> torch.Tensor:
    """The centred evidence rule in plain Python, from the docstring's maths: cosines of
    x_i − mean(x); background = median pair, noise = 1.4826 · median of (b − c) below it,
    floored at 0.05; q = clip((z − low)/(high − low)); the raw cosines' q caps it."""
    k = x.shape[0]

    def cosines(v: torch.Tensor) -> list[list[float]]:
        return [[float(v[i] @ v[j] / (v[i].norm() * v[j].norm())) for j in range(k)]
                for i in range(k)]

    def credibility(c: list[list[float]]) -> list[list[float]]:
        pairs = sorted(c[i][j] for i in range(k) for j in range(i + 1, k))
        level = pairs[(len(pairs) - 1) // 2]  # the lower median, as torch takes it
        below = sorted(level - v for v in pairs if v < level)
        spread = max(1.4826 * below[(len(below) - 1) // 2] if below else 0.0, 0.05)
        return [[min(1.0, max(0.0, ((c[i][j] - level) / spread - low) / (high - low)))
                 for j in range(k)] for i in range(k)]

    v = x / x.norm(dim=1, keepdim=True) if unit else x
    q = credibility(cosines(v - v.mean(dim=0)))
    if raw_gate:
        raw = credibility(cosines(x))
        q = [[min(a, b) for a, b in zip(qa, qb, strict=True)]
             for qa, qb in zip(q, raw, strict=True)]
    out = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        row = [1.0 if j == i else q[i][j] for j in range(k)]
        for j in range(k):
            out[i, j] = row[j] / sum(row)
    return out


def _federation(gen: torch.Generator, tasks: Sequence[int], noise: float) -> torch.Tensor:
    """Task vectors sharing a common component (the head, the common inputs), one task
    direction per group, and each client's own noise."""
    directions = torch.randn(max(tasks) + 1, 24, generator=gen, dtype=torch.float64)
    common = 1.5 * torch.randn(24, generator=gen, dtype=torch.float64)
    return torch.stack([common + directions[t]
                        + noise * torch.randn(24, generator=gen, dtype=torch.float64)
                        for t in tasks])


@pytest.mark.parametrize(("centre", "raw_gate", "high"), [
    ("unit", False, 3.0),  # the default
    ("gram", False, 3.0), ("gram", True, 3.0), ("gram", True, 2.0), ("unit", True, 2.0)])
@pytest.mark.parametrize("tasks", [(0, 0, 1, 1, 2, 3), (0, 0, 0, 1, 1, 2, 2, 3)])
def test_centred_rule_against_hand_computed_weights(tasks, centre: str, raw_gate: bool,
                                                    high: float) -> None:
    # two singletons (tasks 2 and 3, or task 3) among pairs and a triple
    gen = torch.Generator().manual_seed(len(tasks) + int(high))
    x = _federation(gen, tasks, noise=0.8)
    strategy = Strategy(method="fedbip", evidence_centre=centre,
                        evidence_centre_raw_gate=raw_gate, evidence_high=high)
    table = compute_weights(strategy, k=len(tasks), report=_Source({"layers.0.q": x}))
    torch.testing.assert_close(table.matrices["model"],
                               _by_hand(x, low=1.0, high=high, raw_gate=raw_gate,
                                        unit=centre == "unit"))


def test_the_raw_gate_keeps_two_small_groups_apart() -> None:
    # a group of six (a shared direction plus each client's own) and two unrelated pairs:
    # the pairs are orthogonal to each other, but both also to the group's direction,
    # which dominates the mean, so the centred pairs look alike
    gen = torch.Generator().manual_seed(9)
    x = torch.zeros(10, 16, dtype=torch.float64)
    x[:6, 0] = 1.0
    x[:6, 6:12] = torch.eye(6, dtype=torch.float64)
    x[6:8, 3] = 1.0
    x[8:10, 4] = 1.0
    x += 0.05 * torch.randn(10, 16, generator=gen, dtype=torch.float64)
    raw_cos = _cosine_rows(x)
    centred = centred_cosine(raw_cos, x.norm(dim=1))
    assert abs(float(raw_cos[6, 8])) < 0.05 < float(centred[6, 8])
    source = _Source({"layers.0.q": x})
    free = compute_weights(Strategy(method="fedbip", evidence_centre="gram"), k=10,
                           report=source).matrices["model"]
    gated = compute_weights(Strategy(method="fedbip", evidence_centre="gram",
                                     evidence_centre_raw_gate=True), k=10,
                            report=source).matrices["model"]
    assert float(free[6, 8:].sum()) > 0.1  # the artefact hands weight across the pairs
    assert float(gated[6, 8:].sum()) == 0.0
    assert float(gated[6, 7]) == pytest.approx(0.5)  # the true pair still shares fully
