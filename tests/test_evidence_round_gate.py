"""The evidence rule's round gate (evidence_round_gate): a pair credible in the similarity
memory also needs evidence in this round's own cosines. Weights against hand-computed
ones for K=2, K=3 and a singleton, and against the ungated rule on each source."""

from __future__ import annotations

import pytest
import torch

from fedbip_hub.engine.memory import SimilarityMemory, SimilarityView
from fedbip_hub.engine.similarity import MODEL_KEY, SimilarityReport
from fedbip_hub.engine.strategies import Strategy, compute_weights

GATED = {"evidence_round_gate": True}


def sym(k: int, pairs: dict[tuple[int, int], float]) -> torch.Tensor:
    c = torch.eye(k, dtype=torch.float64)
    for (i, j), v in pairs.items():
        c[i, j] = c[j, i] = v
    return c


def view(memory: torch.Tensor, current: torch.Tensor | None,
         layers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> SimilarityView:
    """A memory view with model-level (and optionally per-layer) cosines, and this round's
    cosines behind it, as ``SimilarityMemory.view`` builds it."""
    k = memory.shape[0]
    clients = [f"c{i}" for i in range(k)]
    mem_layers = {key: m for key, (m, _) in (layers or {}).items()}
    round_view = None
    if current is not None:
        round_view = SimilarityView(clients, {
            "model": {MODEL_KEY: current},
            "layer": {key: c for key, (_, c) in (layers or {}).items()}})
    return SimilarityView(clients, {"model": {MODEL_KEY: memory}, "layer": mem_layers},
                          this_round=round_view)  # type: ignore[arg-type]


def model_weights(source: SimilarityView, **options: object) -> torch.Tensor:
    strategy = Strategy(method="fedbip", **options)
    return compute_weights(strategy, k=source.model_cosine().shape[0],
                           report=source).matrices[MODEL_KEY]


def two_by_two(peer: float) -> torch.Tensor:
    return torch.tensor([[1 - peer, peer], [peer, 1 - peer]], dtype=torch.float64)


def test_two_clients_take_the_lesser_evidence() -> None:
    # K=2 uses the priors (background 0, noise 0.1): memory 0.4 → z = 4 → q = 1;
    # this round 0.2 → z = 2 → q = 1/2 → the peer weighs 0.5 / 1.5
    source = view(sym(2, {(0, 1): 0.4}), sym(2, {(0, 1): 0.2}))
    torch.testing.assert_close(model_weights(source), two_by_two(0.5))
    torch.testing.assert_close(model_weights(source, **GATED), two_by_two(1 / 3))
    # the gate only lowers: a round with more evidence than the memory changes nothing
    stronger = view(sym(2, {(0, 1): 0.2}), sym(2, {(0, 1): 0.4}))
    torch.testing.assert_close(model_weights(stronger, **GATED), two_by_two(1 / 3))
    # this round inside the noise (0.05 → z = 0.5): the client keeps its own update
    quiet = view(sym(2, {(0, 1): 0.4}), sym(2, {(0, 1): 0.05}))
    torch.testing.assert_close(model_weights(quiet, **GATED), torch.eye(2, dtype=torch.float64))


def test_three_clients_a_pair_and_a_singleton() -> None:
    # memory: pair (0, 1) at 0.5, unrelated 0.05 and 0.0; median 0.05, noise 1.4826·0.05
    # → z(0, 1) = 6.1: q = 1, the pair shares half and half, client 2 keeps itself
    memory = sym(3, {(0, 1): 0.5, (0, 2): 0.05, (1, 2): 0.0})
    # this round the pair is weaker: 0.2 → z = 0.15 / (1.4826·0.05) = 2.02 → q = 0.51
    current = sym(3, {(0, 1): 0.2, (0, 2): 0.05, (1, 2): 0.0})
    spread = 1.4826 * 0.05
    q = ((0.15 / spread) - 1.0) / 2.0
    expected = torch.tensor([[1, q, 0], [q, 1, 0], [0, 0, 1]], dtype=torch.float64)
    expected = expected / expected.sum(dim=1, keepdim=True)
    ungated = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(model_weights(view(memory, current)), ungated)
    torch.testing.assert_close(model_weights(view(memory, current), **GATED), expected)


def test_a_singleton_with_a_remembered_spurious_peer_keeps_its_own_update() -> None:
    # 5 clients, centring off for hand-computation: pairs (0, 1) and (2, 3) share a task,
    # 4 has no true peer. The memory remembers a first-round coincidence of 4 with 0
    # (0.45, as high as a true pair); this round 4 is as unrelated as everyone else.
    memory = sym(5, {(0, 1): 0.45, (2, 3): 0.40, (0, 4): 0.45})
    current = sym(5, {(0, 1): 0.40, (2, 3): 0.40, (0, 4): 0.01})
    for i, j in [(0, 2), (0, 3), (1, 2), (1, 3), (1, 4), (2, 4), (3, 4)]:
        memory[i, j] = memory[j, i] = current[i, j] = current[j, i] = 0.02 * (i + j) % 0.07
    off = {"evidence_centre": "off"}
    ungated = model_weights(view(memory, current), **off)
    assert float(ungated[4, 0]) > 0.3  # the memory alone hands the singleton to 0
    gated = model_weights(view(memory, current), **off, **GATED)
    assert float(gated[4, 4]) == pytest.approx(1.0)
    assert float(gated[0, 4]) == pytest.approx(0.0)
    # the true pairs are credible in both and keep their weights (z ≥ 3 in both: q = 1)
    for i, j in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        assert float(gated[i, j]) == pytest.approx(0.5)


@pytest.mark.parametrize("k", [4, 7])
def test_gated_credibility_is_the_lesser_of_the_two_sources(k: int) -> None:
    # with centring (the default, from 4 clients on) and per-layer shrinkage and the model
    # gate: the gated weights are the evidence rule's with q = min(q_memory, q_round),
    # each q read from that source's ungated weights (q_ik = w_ik / w_ii)
    gen = torch.Generator().manual_seed(k)

    def cosines() -> torch.Tensor:
        x = torch.randn(k, 6, generator=gen, dtype=torch.float64) + 0.8
        unit = x / x.norm(dim=1, keepdim=True)
        return unit @ unit.T

    layers = {f"bert.encoder.layer.{n}": (cosines(), cosines()) for n in range(2)}
    source = view(cosines(), cosines(), layers)
    strategy = Strategy(method="fedbip-l")
    memory_only = compute_weights(strategy, k=k, report=view(source.model_cosine(), None,
                                                             layers))
    round_only = compute_weights(strategy, k=k, report=source.this_round)
    gated = compute_weights(strategy.model_copy(update=GATED), k=k, report=source)
    pairs = [(memory_only.matrices[key], round_only.matrices[key], gated.matrices[key])
             for key in layers]
    pairs.append((memory_only.fallback, round_only.fallback, gated.fallback))
    for mem, cur, out in pairs:
        q = torch.minimum(mem / mem.diagonal()[:, None], cur / cur.diagonal()[:, None])
        torch.testing.assert_close(out, q / q.sum(dim=1, keepdim=True))


def test_the_memory_view_carries_this_rounds_cosines() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    report = SimilarityReport(["a", "b", "c"], {"model.layers.0.q_proj": x @ x.T})
    memory = SimilarityMemory(granularity="layer").updated(report, [True] * 3, decay=1.0)
    assert memory.view(report).this_round is report
    # without a round behind the source (similarity_memory 0: the source is the round),
    # the gate changes nothing
    strategy = Strategy(method="fedbip-l")
    torch.testing.assert_close(
        compute_weights(strategy.model_copy(update=GATED), k=3, report=report).matrices,
        compute_weights(strategy, k=3, report=report).matrices)
