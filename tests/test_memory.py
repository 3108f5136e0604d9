"""The similarity memory: cosines of each pair's concatenated history of task vectors."""

from __future__ import annotations

import pytest
import torch

from fedbip_hub.engine.memory import SimilarityMemory, storage_granularity
from fedbip_hub.engine.similarity import SimilarityReport
from fedbip_hub.errors import FedbipError

MODULES = ("model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.q_proj")
NAMES = ["alice", "bob", "carol"]


def _report(names: list[str], vectors: dict[str, dict[str, torch.Tensor]]
            ) -> SimilarityReport:
    grams = {}
    for module in MODULES:
        stacked = torch.stack([vectors[n][module] for n in names]).double()
        grams[module] = stacked @ stacked.T
    return SimilarityReport(list(names), grams)


def _random_vectors(names: list[str], gen: torch.Generator) -> dict[str, dict]:
    return {n: {m: torch.randn(6, generator=gen) for m in MODULES} for n in names}


def _brute_force(history: list[tuple[list[str], dict, list[bool], list[float]]],
                 a: str, b: str, modules: tuple[str, ...], decay: float) -> float:
    """cos of a's and b's concatenated (γ^age-weighted, norm-guard-scaled) vectors over
    the rounds in which one of the two was fresh."""
    xs, ys = [], []
    compared = [(names, vectors, scale) for names, vectors, fresh, scale in history
                if a in names and b in names
                and (fresh[names.index(a)] or fresh[names.index(b)])]
    for age, (names, vectors, scale) in enumerate(reversed(compared)):
        w = decay ** (age / 2)  # each of x and y carries √γ^age: their product γ^age
        sa, sb = scale[names.index(a)], scale[names.index(b)]
        xs.append(w * sa * torch.cat([vectors[a][m] for m in modules]).double())
        ys.append(w * sb * torch.cat([vectors[b][m] for m in modules]).double())
    x, y = torch.cat(xs), torch.cat(ys)
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_memory_cosines_equal_the_concatenated_history_cosine(decay):
    gen = torch.Generator().manual_seed(0)
    # Round 1: alice and bob. Round 2: carol joins, bob is not fresh (compared through his
    # last vector). Round 3: only bob is fresh, and alice's update is clipped to 0.3.
    plan = [(["alice", "bob"], [True, True], [1.0, 1.0]),
            (["alice", "bob", "carol"], [True, False, True], [1.0, 1.0, 1.0]),
            (["alice", "bob", "carol"], [False, True, False], [0.3, 1.0, 1.0])]
    memory = SimilarityMemory(granularity="layer")
    history = []
    last: dict[str, dict] = {}
    for names, fresh, scale in plan:
        new = _random_vectors(names, gen)
        vectors = {n: new[n] if f or n not in last else last[n]
                   for n, f in zip(names, fresh, strict=True)}
        last.update(vectors)
        report = _report(names, vectors)
        memory = memory.updated(report, fresh, decay=decay,
                                scale=torch.tensor(scale, dtype=torch.float64))
        history.append((names, vectors, fresh, scale))
    view = memory.view(report)
    layer0 = ("model.layers.0.q_proj", "model.layers.0.v_proj")
    for i, a in enumerate(NAMES):
        for j, b in enumerate(NAMES):
            if i == j:
                continue
            assert float(view.model_cosine()[i, j]) == pytest.approx(
                _brute_force(history, a, b, MODULES, decay), abs=1e-12)
            assert float(view.cosines("layer")["model.layers.0"][i, j]) == pytest.approx(
                _brute_force(history, a, b, layer0, decay), abs=1e-12)
    assert torch.equal(view.model_cosine(), view.model_cosine().T)


def test_decay_zero_is_this_rounds_cosine_and_uncompared_pairs_fall_back_to_it():
    gen = torch.Generator().manual_seed(1)
    first = _random_vectors(NAMES, gen)
    memory = SimilarityMemory().updated(_report(NAMES, first), [True] * 3, decay=0.0)
    second = {**first, "alice": _random_vectors(["alice"], gen)["alice"]}
    report = _report(NAMES, second)
    view = memory.updated(report, [True, False, False], decay=0.0).view(report)
    this_round = report.model_cosine()
    assert torch.allclose(view.model_cosine()[0], this_round[0])  # alice: compared again
    # bob–carol were not compared this round: the memory keeps round 1's cosine
    assert float(view.model_cosine()[1, 2]) == pytest.approx(
        float(_report(NAMES, first).model_cosine()[1, 2]))
    # A pair the memory never saw (a newcomer with nobody fresh) takes this round's cosine.
    fresh_memory = SimilarityMemory()
    empty = fresh_memory.updated(report, [False, False, False], decay=1.0).view(report)
    assert torch.allclose(empty.model_cosine(), this_round)


def test_module_memories_give_layer_and_model_cosines_as_sums():
    gen = torch.Generator().manual_seed(2)
    report = _report(NAMES, _random_vectors(NAMES, gen))
    view = SimilarityMemory(granularity="module").updated(report, [True] * 3,
                                                          decay=1.0).view(report)
    assert set(view.cosines("module")) == set(MODULES)
    assert torch.allclose(view.cosines("layer")["model.layers.0"],
                          report.cosines("layer")["model.layers.0"])
    assert torch.allclose(view.model_cosine(), report.model_cosine())
    layer_view = SimilarityMemory().updated(report, [True] * 3, decay=1.0).view(report)
    with pytest.raises(ValueError, match="per layer"):
        layer_view.cosines("module")


def test_storage_round_trip_and_granularity_change_and_corruption():
    gen = torch.Generator().manual_seed(3)
    report = _report(NAMES, _random_vectors(NAMES, gen))
    memory = SimilarityMemory().updated(report, [True] * 3, decay=1.0)
    loaded = SimilarityMemory.from_bytes(memory.to_bytes(), granularity="model")
    assert loaded.clients == NAMES and loaded.granularity == "layer"
    for key in memory.cross:
        assert torch.equal(loaded.cross[key], memory.cross[key])
        assert torch.equal(loaded.own[key], memory.own[key])
    # A federation switched to per-module weights starts a fresh memory.
    restarted = SimilarityMemory.from_bytes(memory.to_bytes(), granularity="module")
    assert restarted.clients == [] and restarted.granularity == "module"
    with pytest.raises(FedbipError, match=r"similarity_memory\.safetensors") as info:
        SimilarityMemory.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
                                    granularity="layer")
    assert "Delete" in info.value.hint
    assert storage_granularity("model") == "layer"


def test_forgetting_a_client_drops_only_its_rows_and_columns():
    gen = torch.Generator().manual_seed(4)
    report = _report(NAMES, _random_vectors(NAMES, gen))
    memory = SimilarityMemory().updated(report, [True] * 3, decay=1.0)
    kept = memory.without(["bob"])
    assert kept.clients == ["alice", "carol"]
    for key in memory.cross:
        assert torch.equal(kept.cross[key], memory.cross[key][[0, 2]][:, [0, 2]])
        assert torch.equal(kept.own[key], memory.own[key][[0, 2]][:, [0, 2]])
    assert memory.without(["dave"]) is memory
    # bob comes back: his pairs start from this round's evidence alone
    again = kept.updated(report, [False, True, False], decay=1.0).view(report)
    assert torch.allclose(again.model_cosine()[1], report.model_cosine()[1])
