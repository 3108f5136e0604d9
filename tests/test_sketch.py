"""Sketched similarity (fedbip_hub.engine.sketch): determinism, accuracy against the exact
low-rank Gram, unbiasedness, exact norms, the strategy's mode choice, the round record,
and O(k) top-k merges."""

from __future__ import annotations

import math

import pytest
import torch
from factories import write_raw_adapter
from federation_helpers import new_local_federation, set_strategy

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine import merge as merge_module
from fedbip_hub.engine.lowrank import cosine_from_gram, lowrank_gram
from fedbip_hub.engine.merge import MergePlan, _merge_lowrank, personalize
from fedbip_hub.engine.similarity import compute_similarity
from fedbip_hub.engine.sketch import (
    SketchSpec,
    derive_seed,
    projection,
    similarity_mode,
    sketch_module_gram,
    sketched_similarity,
)
from fedbip_hub.engine.strategies import Strategy, WeightTable, compute_weights
from fedbip_hub.engine.task_vectors import LowRankDelta, TaskVector
from fedbip_hub.server.rounds import RoundRunner

F64 = torch.float64


def _grouped(k: int, d: int, r: int, modules: int, seed: int) -> dict[str, list[LowRankDelta]]:
    """K clients in two task groups: same-group cosines ≈ 0.45, cross-group ≈ 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in range(modules):
        centres = [(torch.randn(d, r, generator=gen), torch.randn(r, d, generator=gen))
                   for _ in range(2)]
        out[f"model.layers.{m // 2}.proj{m % 2}"] = [
            LowRankDelta(centres[c % 2][0] + 0.7 * torch.randn(d, r, generator=gen),
                         centres[c % 2][1] + 0.7 * torch.randn(r, d, generator=gen))
            for c in range(k)]
    return out


def _exact(deltas: list[LowRankDelta]) -> torch.Tensor:
    return lowrank_gram([x.u for x in deltas], [x.v for x in deltas]).to(F64)


def test_a_fixed_seed_makes_the_sketch_deterministic():
    data = _grouped(6, 128, 4, 1, seed=0)
    (module, deltas), = data.items()
    first, _ = sketch_module_gram(deltas, module, SketchSpec(size=32, seed=7))
    again, _ = sketch_module_gram(deltas, module, SketchSpec(size=32, seed=7))
    other, _ = sketch_module_gram(deltas, module, SketchSpec(size=32, seed=8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.equal(projection(128, SketchSpec(32), 5), projection(128, SketchSpec(32), 5))
    assert derive_seed("a", 1) == derive_seed("a", 1) != derive_seed("a", 2)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_sketched_cosines_approximate_exact_ones(kind):
    """Error ~ 1/√(s·r) per module; module sums (layer, model) average it down."""
    s, r = 64, 8
    data = _grouped(8, 256, r, 4, seed=1)
    spec = SketchSpec(size=s, seed=3, kind=kind)
    exact = {m: _exact(ds) for m, ds in data.items()}
    sketched = {m: sketch_module_gram(ds, m, spec)[0] for m, ds in data.items()}
    scale = 1 / math.sqrt(s * r)  # ≈ 0.044
    for m in data:
        diff = cosine_from_gram(sketched[m]) - cosine_from_gram(exact[m])
        assert float(diff.abs().max()) < 3 * scale
    model = cosine_from_gram(sum(sketched.values())) - cosine_from_gram(sum(exact.values()))
    assert float(model.abs().max()) < 1.5 * scale
    # the structure survives: same-group pairs stay well above cross-group ones
    cos = cosine_from_gram(sum(sketched.values()))
    assert float(cos[0, 2]) > 0.3 and abs(float(cos[0, 1])) < 0.15


def test_larger_sketches_are_more_accurate():
    data = _grouped(8, 256, 4, 2, seed=2)
    exact = cosine_from_gram(sum(_exact(ds) for ds in data.values()))

    def error(size: int) -> float:
        errors = []
        for seed in range(4):
            spec = SketchSpec(size=size, seed=seed)
            gram = sum(sketch_module_gram(ds, m, spec)[0] for m, ds in data.items())
            errors.append(float((cosine_from_gram(gram) - exact).abs().mean()))
        return sum(errors) / len(errors)

    assert error(128) < 0.75 * error(16)


def test_sketched_inner_products_are_unbiased():
    """The mean over many seeds converges to the exact Gram (1/s scaling, E[SSᵀ] = I)."""
    (module, deltas), = _grouped(3, 48, 2, 1, seed=4).items()
    exact = _exact(deltas)
    runs = torch.stack([sketch_module_gram(deltas, module, SketchSpec(size=8, seed=seed))[0]
                        for seed in range(400)])
    stderr = runs.std(dim=0) / math.sqrt(runs.shape[0])
    assert bool(((runs.mean(dim=0) - exact).abs() < 4 * stderr + 1e-9).all())


def test_projections_have_identity_second_moment():
    for kind in ("gaussian", "rademacher"):
        s = projection(64, SketchSpec(size=4000, kind=kind), 1)
        assert s is None  # s ≥ d: that side is not projected (exact)
        s = projection(4000, SketchSpec(size=64, kind=kind), 1, dtype=F64)
        assert s.shape == (4000, 64)
        if kind == "rademacher":
            assert torch.allclose(s.abs(), torch.full_like(s, 1 / 8))
        # entries of variance 1/s: column Gram ≈ (d/s)·I, hence E[S Sᵀ] = I
        normalised = s.T @ s * 64 / 4000
        assert float((normalised - torch.eye(64, dtype=F64)).abs().max()) < 0.15


def test_a_sketch_as_large_as_the_module_is_exact():
    (module, deltas), = _grouped(4, 32, 3, 1, seed=5).items()
    gram, norms = sketch_module_gram(deltas, module, SketchSpec(size=32))
    assert torch.allclose(gram, _exact(deltas), rtol=1e-5, atol=1e-3)
    assert torch.allclose(norms, _exact(deltas).diagonal(), rtol=1e-5)


def test_report_from_adapters_has_exact_norms_and_subsets(tmp_path):
    shapes = {f"model.layers.{i}.self_attn.{p}": (96, 96) for i in range(2) for p in "qv"}
    folders = [write_raw_adapter(tmp_path / f"c{k}", shapes, r=4, seed=k,
                                 dense={"lm_head.weight": torch.randn(8, 96)})
               for k in range(5)]
    vectors = [TaskVector(LoraAdapter(f), name=f"c{k}", dtype=F64)
               for k, f in enumerate(folders)]
    exact = compute_similarity(vectors)
    report = sketched_similarity(vectors, SketchSpec(size=24, seed=1))
    assert torch.allclose(report.norms(), exact.norms(), rtol=1e-9)
    # dense heads stay exact
    assert torch.allclose(report.grams["lm_head.weight"], exact.grams["lm_head.weight"])
    assert not torch.allclose(report.grams[next(iter(shapes))], exact.grams[next(iter(shapes))])
    sub = report.subset([3, 1])
    assert sub.clients == ["c3", "c1"]
    assert torch.allclose(sub.norms(), exact.norms()[[3, 1]])
    assert report.to_json()["sketch"] == {"mode": "sketch", "sketch_size": 24,
                                          "sketch_seed": 1, "sketch_kind": "gaussian"}
    bf = float((report.model_cosine() - exact.model_cosine()).abs().max())
    assert bf < 0.25  # tiny s·r: a loose bound, the accuracy tests are above


def test_strategy_chooses_the_mode():
    assert similarity_mode(Strategy(), 10) == "exact"
    assert similarity_mode(Strategy(sketch_threshold=10), 10) == "sketch"
    assert similarity_mode(Strategy(sketch_threshold=10, similarity_space="params"),
                           50) == "exact"
    assert similarity_mode(Strategy(similarity_mode="sketch"), 2) == "sketch"
    assert similarity_mode(Strategy(similarity_mode="exact", sketch_threshold=2), 99) == "exact"
    with pytest.raises(ValueError, match="delta"):
        Strategy(similarity_mode="sketch", similarity_space="params")


def test_a_sketch_round_records_its_seed_and_is_reproducible(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    set_strategy(fed, similarity_mode="sketch", sketch_size=8)
    first = RoundRunner(fed, dry_run=True).run()
    again = RoundRunner(fed, dry_run=True).run()
    info = first["compute"]["similarity"]
    assert info["mode"] == "sketch" and info["sketch_size"] == 8
    assert isinstance(info["sketch_seed"], int)
    # derived from the pinned inputs: a resumed round draws the same projections
    assert again["compute"]["similarity"] == info
    assert again["cosine"] == first["cosine"]
    set_strategy(fed, sketch_seed=42)
    fixed = RoundRunner(fed).run()
    assert fixed["status"] == "completed"
    assert fixed["compute"]["similarity"]["sketch_seed"] == 42
    assert sorted(fixed["outputs"]) == ["alice", "bob", "carol"]


def test_zero_weight_peers_are_never_touched_by_the_merge():
    """Top-k merges stack only the peers with a non-zero coefficient: O(k) per target."""

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("a zero-weight peer was read")

    gen = torch.Generator().manual_seed(0)
    real = [LowRankDelta(torch.randn(16, 2, generator=gen), torch.randn(2, 12, generator=gen))
            for _ in range(2)]
    deltas = [real[0], Untouchable(), Untouchable(), real[1], Untouchable()]
    coeffs = torch.tensor([0.5, 0.0, 0.0, 0.25, 0.0], dtype=F64)
    u, v, _ = _merge_lowrank(None, deltas, coeffs, None, torch.float32)
    expected = 0.5 * real[0].u @ real[0].v + 0.25 * real[1].u @ real[1].v
    assert torch.allclose(u @ v, expected, atol=1e-5)


def _one_module_vectors(root, k: int, r: int) -> list[TaskVector]:
    shapes = {"model.layers.0.self_attn.q_proj": (24, 20)}
    folders = [write_raw_adapter(root / f"c{i}", shapes, r=r, seed=i) for i in range(k)]
    return [TaskVector(LoraAdapter(f), name=f"c{i}") for i, f in enumerate(folders)]


def _stacked_widths(monkeypatch) -> list[int]:
    """Records the width (Σ of the peers' ranks) of every stack the merge refactorizes."""
    stacked: list[int] = []
    real = merge_module._merge_parts

    def spy(parts, rank, grams):
        stacked.append(sum(p.rank for p in parts))
        return real(parts, rank, grams)

    monkeypatch.setattr(merge_module, "_merge_parts", spy)
    return stacked


def test_top_k_weights_stack_k_plus_one_peers(tmp_path, monkeypatch):
    k, top_k, r = 7, 2, 3
    vectors = _one_module_vectors(tmp_path, k, r)
    weights = compute_weights(Strategy(method="fedbip", top_k=top_k), k=k,
                              report=compute_similarity(vectors))
    stacked = _stacked_widths(monkeypatch)
    plan = MergePlan(targets=list(range(k)), contribution=torch.ones(k, dtype=F64),
                     latest=[None] * k)
    personalize(vectors, weights, plan, rank=r)
    nonzero = (weights.matrices["model"] != 0).sum(dim=1).tolist()
    assert max(nonzero) <= top_k + 1
    assert stacked == [n * r for n in nonzero]


def test_weight_table_with_dense_rows_stacks_every_peer(tmp_path, monkeypatch):
    """The other side of the O(k) claim: without top_k every peer is stacked."""
    vectors = _one_module_vectors(tmp_path, 4, 2)
    stacked = _stacked_widths(monkeypatch)
    table = WeightTable(None, {"model": torch.full((4, 4), 0.25, dtype=F64)})
    personalize(vectors, table, MergePlan([0], torch.ones(4, dtype=F64), [None]), rank=2)
    assert stacked == [8]
