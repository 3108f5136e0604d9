"""Weight rules against numbers worked out by hand, and the strategy config."""

from __future__ import annotations

import math

import pytest
import torch
from factories import brute_cosine
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbip_hub.engine.evidence import model_credibility
from fedbip_hub.engine.lowrank import cosine_from_gram, dense_gram
from fedbip_hub.engine.similarity import SimilarityReport
from fedbip_hub.engine.strategies import METHODS, Strategy, compute_weights
from fedbip_hub.engine.weighting import (
    WeightOptions,
    group_weights,
    local_weights,
    similarity_weights,
    size_weights,
    uniform_weights,
)
from fedbip_hub.errors import ConfigError

F64 = torch.float64
# A symmetric cosine matrix with a conflicting pair (0, 2) and an orthogonal pair (1, 3).
COS = torch.tensor([[1.0, 0.5, -0.2, 0.3],
                    [0.5, 1.0, 0.1, 0.0],
                    [-0.2, 0.1, 1.0, 0.4],
                    [0.3, 0.0, 0.4, 1.0]], dtype=F64)


def _close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=0, atol=tol)


def test_normalize_clips_negatives_by_default():
    w = similarity_weights(COS, WeightOptions())
    _close(w, [[1 / 1.8, 0.5 / 1.8, 0.0, 0.3 / 1.8],
               [0.5 / 1.6, 1 / 1.6, 0.1 / 1.6, 0.0],
               [0.0, 0.1 / 1.5, 1 / 1.5, 0.4 / 1.5],
               [0.3 / 1.7, 0.0, 0.4 / 1.7, 1 / 1.7]])


def test_normalize_keeping_negatives_is_paper_literal():
    w = similarity_weights(COS, WeightOptions(clip_negative=False))
    _close(w[0], [1 / 1.6, 0.5 / 1.6, -0.2 / 1.6, 0.3 / 1.6])  # [.625, .3125, -.125, .1875]
    _close(w[2], [-0.2 / 1.3, 0.1 / 1.3, 1 / 1.3, 0.4 / 1.3])


def test_diagonal_is_taken_as_one():
    cos = COS.clone()
    cos.fill_diagonal_(0.25)
    torch.testing.assert_close(similarity_weights(cos, WeightOptions()),
                               similarity_weights(COS, WeightOptions()))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_softmax_with_temperature(temperature):
    e = [math.exp(c / temperature) for c in (1.0, 0.5, 0.3)]
    w = similarity_weights(COS, WeightOptions(rule="softmax", temperature=temperature))
    _close(w[0], [e[0] / sum(e), e[1] / sum(e), 0.0, e[2] / sum(e)])  # c02 < 0 dropped
    e_all = [math.exp(c / temperature) for c in (1.0, 0.5, -0.2, 0.3)]
    w = similarity_weights(COS, WeightOptions(rule="softmax", temperature=temperature,
                                              clip_negative=False))
    _close(w[0], [x / sum(e_all) for x in e_all])


def test_zscore_gives_self_a_share_and_splits_the_rest_by_standardised_cosines():
    # row 0 peers: 0.5, -0.2, 0.3 → clipped first: 0.5, 0, 0.3 → mean 0.8/3,
    # z ∝ (0.7/3, -0.8/3, 0.1/3) → positive parts split 7:1
    w = similarity_weights(COS, WeightOptions(rule="zscore", self_share=0.5))
    _close(w[0], [0.5, 0.4375, 0.0, 0.0625])
    w = similarity_weights(COS, WeightOptions(rule="zscore", self_share=0.7))
    _close(w[0], [0.7, 0.2625, 0.0, 0.0375])
    # row 3 peers: 0.3, 0.0, 0.4 → mean 0.7/3, z ∝ (0.3-0.2333, -, 0.4-0.2333)
    a, b = 0.3 - 0.7 / 3, 0.4 - 0.7 / 3
    _close(w[3], [0.3 * a / (a + b), 0.0, 0.3 * b / (a + b), 0.7])
    # without clipping the conflicting peer stays in the statistics: mean 0.2
    w = similarity_weights(COS, WeightOptions(rule="zscore", self_share=0.5,
                                              clip_negative=False))
    _close(w[0], [0.5, 0.375, 0.0, 0.125])


def test_zscore_equal_peers_split_evenly_and_no_positive_peer_means_self_only():
    cos = torch.tensor([[1, 0.2, 0.2], [0.2, 1, -0.1], [0.2, -0.1, 1]], dtype=F64)
    w = similarity_weights(cos, WeightOptions(rule="zscore", self_share=0.6))
    _close(w[0], [0.6, 0.2, 0.2])
    # row 1 peers 0.2, -0.1 → z = (1, -1) → only client 0 gets the peers' share
    _close(w[1], [0.4, 0.6, 0.0])
    cos = torch.tensor([[1, -0.3, -0.1], [-0.3, 1, -0.2], [-0.1, -0.2, 1]], dtype=F64)
    _close(similarity_weights(cos, WeightOptions(rule="zscore")), torch.eye(3).tolist())


def test_top_k_keeps_the_most_similar_peers_and_self():
    w = similarity_weights(COS, WeightOptions(top_k=1))
    _close(w[0], [1 / 1.5, 0.5 / 1.5, 0.0, 0.0])
    _close(w[2], [0.0, 0.0, 1 / 1.4, 0.4 / 1.4])
    w = similarity_weights(COS, WeightOptions(top_k=2))
    _close(w[0], [1 / 1.8, 0.5 / 1.8, 0.0, 0.3 / 1.8])
    _close(similarity_weights(COS, WeightOptions(top_k=0)), torch.eye(4).tolist())
    _close(similarity_weights(COS, WeightOptions(top_k=10)),
           similarity_weights(COS, WeightOptions()).tolist())


def test_self_floor():
    w = similarity_weights(COS, WeightOptions(self_floor=0.8))
    # peers 0.5 and 0.3 share the remaining 0.2 as 5:3
    _close(w[0], [0.8, 0.125, 0.0, 0.075])
    w = similarity_weights(COS, WeightOptions(self_floor=0.3))  # already above: unchanged
    _close(w, similarity_weights(COS, WeightOptions()).tolist())
    w = similarity_weights(COS, WeightOptions(rule="softmax", temperature=1.0, self_floor=0.9))
    assert w[:, :].diagonal().tolist() == pytest.approx([0.9] * 4)


def test_allowed_mask_restricts_peers_to_the_fresh_ones_plus_self():
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    allowed[:, [0, 2]] = True  # only clients 0 and 2 have new updates
    w = similarity_weights(COS, WeightOptions(), allowed)
    _close(w, [[1.0, 0.0, 0.0, 0.0],  # its only fresh peer conflicts
               [0.5 / 1.6, 1 / 1.6, 0.1 / 1.6, 0.0],
               [0.0, 0.0, 1.0, 0.0],
               [0.3 / 1.7, 0.0, 0.4 / 1.7, 1 / 1.7]])
    for rule in ("normalize", "softmax", "zscore", "evidence"):
        w = similarity_weights(COS, WeightOptions(rule=rule, clip_negative=False), allowed)
        for i in range(4):
            for k in range(4):
                if not allowed[i, k] and k != i:
                    assert w[i, k] == 0.0, (rule, i, k)


def test_size_weights():
    _close(size_weights([10, 30, 0, 60]), [[0.1, 0.3, 0.0, 0.6]] * 4)
    allowed = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    _close(size_weights([10, 30, 60], allowed), [[0.25, 0.75, 0.0], [0.0, 1.0, 0.0],
                                                 [1 / 7, 0.0, 6 / 7]])
    _close(size_weights([0, 0, 0]), [[1 / 3] * 3] * 3)  # no sizes at all: uniform


def test_uniform_local_group():
    _close(uniform_weights(4), [[0.25] * 4] * 4)
    allowed = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    _close(uniform_weights(3, allowed), [[0.5, 0, 0.5], [0, 1, 0], [1 / 3] * 3])
    _close(local_weights(3), torch.eye(3).tolist())
    _close(group_weights(["a", "b", "a", "b", "a"]),
           [[1 / 3, 0, 1 / 3, 0, 1 / 3], [0, 0.5, 0, 0.5, 0], [1 / 3, 0, 1 / 3, 0, 1 / 3],
            [0, 0.5, 0, 0.5, 0], [1 / 3, 0, 1 / 3, 0, 1 / 3]])


@pytest.mark.parametrize("rule", ["normalize", "softmax", "zscore", "evidence"])
def test_all_zero_task_vector_keeps_only_its_self_weight(rule):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(30, generator=gen, dtype=F64)
    vectors = [base + 0.5 * torch.randn(30, generator=gen, dtype=F64) for _ in range(3)]
    vectors.insert(2, torch.zeros(30, dtype=F64))
    cos = cosine_from_gram(dense_gram(vectors))
    torch.testing.assert_close(cos, brute_cosine(vectors))
    w = similarity_weights(cos, WeightOptions(rule=rule, temperature=1.0))
    _close(w[2], [0.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 6),
       rule=st.sampled_from(["normalize", "softmax", "zscore", "evidence"]),
       top_k=st.one_of(st.none(), st.integers(0, 5)),
       floor=st.one_of(st.none(), st.floats(0.0, 1.0)),
       masked=st.booleans())
def test_rows_are_stochastic(seed, k, rule, top_k, floor, masked):
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(k, 5, generator=gen, dtype=F64)
    cos = cosine_from_gram(vectors @ vectors.T)
    allowed = torch.rand(k, k, generator=gen) > 0.5 if masked else None
    opts = WeightOptions(rule=rule, top_k=top_k, self_floor=floor, temperature=0.3)
    w = similarity_weights(cos, opts, allowed)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(k, dtype=F64))
    assert (w >= 0).all()
    if floor is not None:
        assert (w.diagonal() >= floor - 1e-12).all()
    if allowed is not None:
        assert (w[~(allowed | torch.eye(k, dtype=torch.bool))] == 0).all()


# -- strategies ----------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(method="nope"),
    dict(method="fedbip", temperature=0),
    dict(method="fedbip", top_k=-1),
    dict(method="fedbip", self_floor=1.5),
    dict(method="fedbip", self_share=-0.1),
    dict(method="fedbip", rank=0),
    dict(method="fedbip", rule="median"),
    dict(method="fedbip", refactor="qr"),
    dict(method="fedbip", granularity="tensor"),
    dict(method="fedbip", no_such_option=1),
])
def test_strategy_validation_errors_are_config_errors(options):
    method = options.pop("method")
    with pytest.raises(ConfigError) as info:
        Strategy.parse(method, **options)
    assert info.value.exit_code == 2
    assert info.value.hint


def test_strategy_json_round_trip_and_defaults():
    strategy = Strategy.parse("fedbip", rule="zscore", top_k=2, rank=8, personal_heads=True)
    assert Strategy.model_validate_json(strategy.model_dump_json()) == strategy
    assert Strategy().method == "fedbip-l" and Strategy().rule == "evidence"
    assert Strategy().self_share == 0.3  # the zscore rule's, when chosen
    assert Strategy().clip_negative is True
    assert Strategy.parse("fedbip-l").effective_granularity == "layer"
    assert Strategy.parse("fedbip").effective_granularity == "model"
    assert Strategy.parse("fedbip", granularity="module").effective_granularity == "module"
    assert Strategy.parse("fedavg", granularity="layer").effective_granularity is None
    assert {"fedbip", "fedbip-l", "fedavg", "fedit", "uniform", "local", "oracle"} <= \
        set(METHODS)
    assert METHODS["fedit"].merge_space == "params"
    assert METHODS["fedavg"].merge_space == "delta"


def _report():
    """Grams of random per-module vectors: two blocks and a head."""
    gen = torch.Generator().manual_seed(7)
    modules = ["model.layers.0.q", "model.layers.0.v", "model.layers.1.q", "score.weight"]
    vectors = {m: [torch.randn(6, generator=gen, dtype=F64) for _ in range(3)] for m in modules}
    # make layer 1 disagree with layer 0 about who is similar
    vectors["model.layers.1.q"][2] = vectors["model.layers.1.q"][0] + 0.1 * vectors[
        "model.layers.1.q"][2]
    report = SimilarityReport(["a", "b", "c"], {m: dense_gram(v) for m, v in vectors.items()})
    return report, vectors


@pytest.mark.parametrize("rule", ["normalize", "evidence"])
def test_compute_weights_per_layer(rule):
    report, vectors = _report()
    strategy = Strategy.parse("fedbip-l", rule=rule)
    table = compute_weights(strategy, k=3, report=report)
    assert table.granularity == "layer"
    layers = {"model.layers.0": ["model.layers.0.q", "model.layers.0.v"],
              "model.layers.1": ["model.layers.1.q"], "score": ["score.weight"]}
    assert set(table.matrices) == set(layers)
    # the evidence rule caps each layer's credibility by the model level's
    whole = [torch.cat([vectors[m][k] for m in vectors]) for k in range(3)]
    model_cos = brute_cosine(whole)
    cap = model_credibility(model_cos, strategy.weight_options) if rule == "evidence" else None
    for layer, modules in layers.items():
        flat = [torch.cat([vectors[m][k] for m in modules]) for k in range(3)]
        # the evidence rule shrinks per-layer cosines halfway to the model level
        cos = brute_cosine(flat)
        if rule == "evidence":
            cos = 0.5 * model_cos + 0.5 * cos
        expected = similarity_weights(cos, strategy.weight_options, cap=cap)
        torch.testing.assert_close(table.matrices[layer], expected)
    if rule == "normalize":  # (the evidence rule finds no peer among 3 random vectors)
        assert not torch.allclose(table.matrices["model.layers.0"],
                                  table.matrices["model.layers.1"])
    assert table.for_module("model.layers.1.q") is table.matrices["model.layers.1"]
    assert table.for_module("score.weight") is table.matrices["score"]


def test_compute_weights_model_and_module():
    report, vectors = _report()
    table = compute_weights(Strategy.parse("fedbip"), k=3, report=report)
    assert list(table.matrices) == ["model"]
    flat = [torch.cat([vectors[m][k] for m in vectors]) for k in range(3)]
    torch.testing.assert_close(table.matrices["model"], similarity_weights(
        brute_cosine(flat), Strategy.parse("fedbip").weight_options))
    assert table.for_module("model.layers.1.q") is table.matrices["model"]
    table = compute_weights(Strategy.parse("fedbip-m"), k=3, report=report)
    assert set(table.matrices) == set(vectors)
    assert table.for_module("model.layers.0.v") is table.matrices["model.layers.0.v"]


def test_compute_weights_baselines():
    _close(compute_weights(Strategy.parse("fedavg"), k=3, n_examples=[1, 1, 2])
           .matrices["model"], [[0.25, 0.25, 0.5]] * 3)
    _close(compute_weights(Strategy.parse("fedit"), k=2, n_examples=[3, 1]).matrices["model"],
           [[0.75, 0.25]] * 2)
    _close(compute_weights(Strategy.parse("fedavg"), k=2).matrices["model"], [[0.5, 0.5]] * 2)
    _close(compute_weights(Strategy.parse("uniform"), k=2).matrices["model"], [[0.5, 0.5]] * 2)
    _close(compute_weights(Strategy.parse("local"), k=2).matrices["model"], [[1, 0], [0, 1]])
    _close(compute_weights(Strategy.parse("oracle"), k=3, groups=["x", "y", "x"])
           .matrices["model"], [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    table = compute_weights(Strategy.parse("fedavg"), k=2)
    assert table.granularity is None and table.for_module("anything") is table.matrices["model"]


def test_compute_weights_missing_inputs_are_config_errors():
    with pytest.raises(ConfigError):
        compute_weights(Strategy.parse("fedbip"), k=3)
    with pytest.raises(ConfigError):
        compute_weights(Strategy.parse("oracle"), k=3)


def test_compute_weights_honours_allowed():
    report, _ = _report()
    allowed = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    for method in ("fedbip", "fedbip-l", "fedavg", "uniform"):
        table = compute_weights(Strategy.parse(method), k=3, report=report, allowed=allowed)
        for matrix in table.matrices.values():
            assert matrix[0].tolist() == [1.0, 0.0, 0.0]
            assert matrix[1, 2] == 0 and matrix[2, 1] == 0
