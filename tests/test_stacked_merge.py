"""The float64-Gram merge against float64 brute force (dense sum + SVD), on the hard cases:
near-duplicate clients, exact duplicates, rank-deficient factors, zero weights, K=1; and
the batched path against the per-target one, on the CPU, with the same code a GPU runs."""

from __future__ import annotations

import math

import pytest
import torch
from factories import write_raw_adapter

import fedbip_hub.engine.stacked_merge as stacked
from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine.lowrank import gram_core, refactorize, refactorize_qr
from fedbip_hub.engine.merge import MergePlan, personalize
from fedbip_hub.engine.similarity import compute_similarity
from fedbip_hub.engine.stacked_merge import PairGrams, Part, merge_batched, merge_cached
from fedbip_hub.engine.strategies import Strategy, WeightTable, compute_weights
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.errors import AdapterError

F64 = torch.float64
D_OUT, D_IN, R = 96, 80, 4
FP32_EXACT = 3e-7  # relative Frobenius error of a result exact to fp32 precision


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute(parts: list[Part], rank: int | None) -> torch.Tensor:
    """Σ c·U·V in float64, truncated by a dense SVD."""
    dense = sum(p.coeff * (p.u.double() @ p.v.double()) for p in parts)
    if rank is None:
        return dense
    x, s, yt = torch.linalg.svd(dense, full_matrices=False)
    return x[:, :rank] * s[:rank] @ yt[:rank]


def _rel(u: torch.Tensor, v: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(u.double() @ v.double() - expected)
                 / torch.linalg.matrix_norm(expected))


def _random_part(key, coeff, gen, rank=R, scale=1.0):
    return Part(key, coeff, torch.randn(D_OUT, rank, generator=gen) * scale,
                torch.randn(rank, D_IN, generator=gen) * scale)


def _nearly(part: Part, key, coeff, gen, eps: float) -> Part:
    """A factor pair a relative ``eps`` away from ``part``'s (in fp32)."""
    return Part(key, coeff, part.u + eps * part.u.std() * torch.randn(part.u.shape, generator=gen),
                part.v + eps * part.v.std() * torch.randn(part.v.shape, generator=gen))


def _cosine(a: Part, b: Part) -> float:
    x, y = a.u.double() @ a.v.double(), b.u.double() @ b.v.double()
    return float((x * y).sum() / (x.norm() * y.norm()))


def _cases() -> dict[str, list[Part]]:
    gen = _gen(0)
    base = _random_part(0, 1.0, gen)
    near = _nearly(base, 1, 1.0, gen, 1e-3)
    assert 1 - _cosine(base, near) == pytest.approx(1e-6, rel=0.5)  # cosine 1 − 1e-6
    low = torch.randn(D_OUT, 2, generator=gen) @ torch.randn(2, 3 * R, generator=gen)
    return {
        # a client whose upload nearly equals its start: τ = B_up·A_up − B_S·A_S cancels
        "near-duplicate difference": [Part(1, 1.0, near.u, near.v),
                                      Part(0, -1.0, base.u, base.v)],
        # two near-duplicate clients weighed together: a nearly singular stack
        "near-duplicate peers": [Part(0, 0.6, base.u, base.v),
                                 Part(1, 0.4, near.u, near.v)],
        "exact duplicates": [Part(0, 0.3, base.u, base.v), Part(1, 0.7, base.u, base.v),
                             _random_part(2, 0.2, gen)],
        "rank-deficient factors": [Part(0, 0.5, low, torch.randn(3 * R, D_IN, generator=gen)),
                                   _random_part(1, 0.5, gen)],
        "a zero weight": [_random_part(0, 0.5, gen), _random_part(1, 0.0, gen),
                          _random_part(2, 0.5, gen)],
        "K=1": [_random_part(0, 1.0, gen)],
        "many peers": [_random_part(k, 1.0 / 9, gen) for k in range(9)],
    }


CASES = _cases()


@pytest.mark.parametrize("rank", [R, None, 3 * R])
@pytest.mark.parametrize("name", list(CASES))
def test_gram_merge_is_exact_to_fp32_precision(name, rank):
    parts = CASES[name]
    out = merge_cached(parts, rank, PairGrams())
    expected = _brute(parts, rank)
    assert _rel(out.u, out.v, expected) <= FP32_EXACT
    assert out.u.dtype == torch.float32 and out.v.dtype == torch.float32
    if rank is not None:
        assert out.u.shape == (D_OUT, rank) and out.v.shape == (rank, D_IN)
    else:  # "cat": exactly the numerical rank of the sum
        dense = _brute(parts, None)
        assert out.v.shape[0] == int(torch.linalg.matrix_rank(dense, rtol=1e-6))


def test_near_duplicates_are_where_fp32_qr_loses_digits():
    """The case the float64 Grams are for: the former fp32 QR path is ~1e-4 off here."""
    parts = CASES["near-duplicate difference"]
    u = torch.cat([p.u * p.coeff for p in parts], dim=1)
    v = torch.cat([p.v for p in parts], dim=0)
    expected = _brute(parts, R)
    old = refactorize_qr(u, v, R)
    new = refactorize(u, v, R)
    assert _rel(old.u, old.v, expected) > 30 * FP32_EXACT
    assert _rel(new.u, new.v, expected) <= FP32_EXACT


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_truncation_is_eckart_young_optimal(rank):
    parts = CASES["many peers"]
    dense = _brute(parts, None)
    sigma = torch.linalg.svdvals(dense)
    out = merge_cached(parts, rank, PairGrams())
    err = torch.linalg.matrix_norm(out.u.double() @ out.v.double() - dense)
    optimal = math.sqrt(float((sigma[rank:] ** 2).sum()))
    assert float(err) == pytest.approx(optimal, rel=1e-5)
    expected_energy = float((sigma[rank:] ** 2).sum() / (sigma**2).sum())
    assert out.discarded_energy == pytest.approx(expected_energy, rel=1e-6)


def test_gram_core_singular_values_and_balance():
    gen = _gen(3)
    u, v = torch.randn(50, 7, generator=gen, dtype=F64), torch.randn(7, 40, generator=gen,
                                                                     dtype=F64)
    core = gram_core((u.T @ u)[None], (v @ v.T)[None], 4)
    torch.testing.assert_close(core.sigma[0], torch.linalg.svdvals(u @ v)[:7], rtol=1e-9,
                               atol=1e-12)
    uo, vo = u @ core.wu[0], core.wv[0] @ v
    torch.testing.assert_close(uo.norm(dim=0), vo.norm(dim=1), rtol=1e-8, atol=1e-12)


def test_all_zero_sum_is_a_padded_zero():
    zero = Part(0, 1.0, torch.zeros(D_OUT, R), torch.zeros(R, D_IN))
    for rank, width in ((R, R), (None, 1)):
        out = merge_cached([zero], rank, PairGrams())
        assert out.v.shape[0] == width
        assert torch.count_nonzero(out.u) == 0 and torch.count_nonzero(out.v) == 0
        assert out.discarded_energy == 0.0


def _jobs(seed: int = 5) -> list[list[Part]]:
    """Six targets of two task groups, each with its own latest adapter (key None)."""
    gen = _gen(seed)
    peers = [_random_part(k, 1.0, gen) for k in range(6)]
    near = _nearly(peers[0], 6, 1.0, gen, 1e-3)
    jobs = []
    for target in range(6):
        group = [0, 1, 2] if target < 3 else [3, 4, 5]
        weights = torch.rand(len(group), generator=gen)
        parts = [Part(None, 1.0, *(_random_part(None, 1.0, gen, scale=0.5).u,
                                   _random_part(None, 1.0, gen, scale=0.5).v))]
        parts += [Part(k, float(w), peers[k].u, peers[k].v) for k, w in zip(group, weights,
                                                                             strict=True)]
        jobs.append(parts)
    jobs.append([Part(6, 1.0, near.u, near.v), Part(0, -1.0, peers[0].u, peers[0].v)])
    return jobs


@pytest.mark.parametrize("rank", [R, None])
def test_batched_equals_per_target(rank):
    jobs = _jobs()
    cache = PairGrams()
    one_by_one = [merge_cached(parts, rank, cache) for parts in jobs]
    together = merge_batched(jobs, rank)
    for parts, a, b in zip(jobs, one_by_one, together, strict=True):
        expected = _brute(parts, rank)
        assert a.u.shape == b.u.shape and a.v.shape == b.v.shape
        assert _rel(a.u, a.v, expected) <= FP32_EXACT
        assert _rel(b.u, b.v, expected) <= FP32_EXACT
        assert a.discarded_energy == pytest.approx(b.discarded_energy, abs=1e-6)


def test_batched_chunks_give_the_same_results(monkeypatch):
    jobs = _jobs()
    whole = merge_batched(jobs, R)
    monkeypatch.setitem(stacked.BATCH_BYTES, "cpu", 1)  # one job per chunk
    for a, b in zip(whole, merge_batched(jobs, R), strict=True):
        torch.testing.assert_close(a.u.double() @ a.v.double(), b.u.double() @ b.v.double(),
                                   rtol=1e-5, atol=1e-6)


def test_pair_blocks_are_formed_once_per_pair_of_peers():
    jobs = _jobs()[:6]
    cache = PairGrams()
    for parts in jobs:
        merge_cached(parts, R, cache)
    # two groups of three peers: 6 pairs (with self-pairs) each, the latest adapters
    # (key None) never cached
    assert cache.computed == 2 * 6


def test_peer_factors_are_converted_once_while_they_fit_and_change_nothing():
    """The float64 factor cache: each peer is upcast once per module while it fits (a
    target's own part every time), evicted least recently used first, and the results
    do not depend on it."""
    jobs = _jobs()[:6]
    roomy, none = PairGrams(), PairGrams(factor_bytes=0)
    for parts in jobs:
        a, b = merge_cached(parts, R, roomy), merge_cached(parts, R, none)
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    own = len(jobs)  # one latest adapter (key None) per target
    assert roomy.upcasts == 6 + own
    assert none.upcasts > roomy.upcasts
    one_peer = 8 * R * (D_OUT + D_IN)
    group = PairGrams(factor_bytes=3 * one_peer)  # room for one task group's peers
    for parts in jobs:
        merge_cached(parts, R, group)
        assert len(group._slots) <= 3
    assert group.upcasts == roomy.upcasts  # the groups' targets run one after another
    # a slab smaller than a target's stack: its parts never evict each other
    tight = PairGrams(factor_bytes=2 * one_peer)
    for parts in jobs:
        a, b = merge_cached(parts, R, tight), merge_cached(parts, R, none)
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


def test_fp32_products_fall_back_to_float64_when_rounding_is_amplified(monkeypatch):
    calls = []
    real = stacked._fp32_products_suffice

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(stacked, "_fp32_products_suffice", spy)
    merge_cached(CASES["many peers"], R, PairGrams())
    merge_cached(CASES["near-duplicate difference"], R, PairGrams())
    assert calls == [True, False]


def test_fp32_product_choice_is_measured_on_the_unscaled_stack(monkeypatch):
    """The output products run on the unscaled stack (U·(D·wu)), so their rounding is
    measured against its Gram, with the coefficients counted once (in the weights), and
    the choice does not move when every coefficient (ΔW) is scaled by λ."""
    seen = []
    real = stacked._fp32_products_suffice

    def spy(gram_u, *args):
        seen.append((gram_u.diagonal().clone(), real(gram_u, *args)))
        return seen[-1][1]

    monkeypatch.setattr(stacked, "_fp32_products_suffice", spy)
    for scale in (1.0, 1e-6, 1e6):
        parts = [Part(p.key, p.coeff * scale, p.u, p.v) for p in CASES["many peers"]]
        out = merge_cached(parts, R, PairGrams())
        assert _rel(out.u, out.v, _brute(parts, R)) <= FP32_EXACT
        stack = torch.cat([p.u for p in parts], dim=1).double()
        torch.testing.assert_close(seen[-1][0], (stack * stack).sum(dim=0))
    assert [choice for _, choice in seen] == [True, True, True]


@pytest.mark.parametrize("name", list(CASES))
def test_cholesky_bound_is_an_upper_bound_of_the_condition(name):
    """The O(R²) test that picks Cholesky over eigh bounds the equilibrated Gram's κ from
    above (never lets an ill-conditioned stack through); singular stacks fail it."""
    from fedbip_hub.engine.lowrank import CHOLESKY_MAX_COND, _cholesky_accurate

    u = torch.cat([p.u for p in CASES[name]], dim=1).double()
    gram = (u.T @ u)[None]
    lower, info = torch.linalg.cholesky_ex(gram)
    scale = gram[0].diagonal().sqrt()
    equilibrated = gram[0] / scale[:, None] / scale[None, :]
    values = torch.linalg.eigvalsh(equilibrated)
    cond = float(values[-1] / values[0]) if values[0] > 0 else math.inf
    if int(info[0]) != 0:
        assert cond > CHOLESKY_MAX_COND
        return
    eye = torch.eye(gram.shape[-1], dtype=F64)[None]
    inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
    accurate = bool(_cholesky_accurate(gram, inverse)[0])
    size = gram.shape[-1]
    bound = size * float((inverse[0] * scale[None, :]).square().sum())
    assert bound >= cond * (1 - 1e-6)
    assert accurate == (bound <= CHOLESKY_MAX_COND)
    if name in ("many peers", "a zero weight", "K=1"):
        assert accurate  # well-conditioned stacks keep the fast path
    if name in ("exact duplicates", "rank-deficient factors", "near-duplicate peers"):
        assert not accurate


@pytest.fixture
def federation(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj": (24, 20),
              "model.layers.0.self_attn.v_proj": (24, 20)}
    folders = [write_raw_adapter(tmp_path / f"c{k}", shapes, r=3, seed=k) for k in range(5)]
    latest = write_raw_adapter(tmp_path / "latest", shapes, r=3, seed=99)
    vectors = [TaskVector(LoraAdapter(f), name=f"c{k}") for k, f in enumerate(folders)]
    weights = compute_weights(Strategy(method="fedbip", top_k=2), k=5,
                              report=compute_similarity(vectors))
    plan = MergePlan(targets=list(range(5)), contribution=torch.ones(5, dtype=F64),
                     latest=[LoraAdapter(latest)] + [None] * 4)
    return vectors, weights, plan


@pytest.mark.parametrize("refactor", ["svd", "cat"])
def test_personalize_batched_equals_per_target(federation, refactor):
    vectors, weights, plan = federation
    a = personalize(vectors, weights, plan, rank=3, refactor=refactor, batched=False)
    b = personalize(vectors, weights, plan, rank=3, refactor=refactor, batched=True)
    exact = personalize(vectors, weights, plan, rank=3, refactor=refactor, dtype=F64)
    for x, y, z in zip(a, b, exact, strict=True):
        for module in x.modules:
            expected = z.delta_weight(module)
            torch.testing.assert_close(x.delta_weight(module), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(y.delta_weight(module), expected, rtol=1e-5, atol=1e-6)
            assert x.modules[module][1].shape == y.modules[module][1].shape


def test_weight_table_zero_rows_merge_to_the_latest(federation):
    vectors, _, plan = federation
    table = WeightTable(None, {"model": torch.zeros(5, 5, dtype=F64)})
    (out, *_) = personalize(vectors, table, plan, rank=3)
    for module in out.modules:
        torch.testing.assert_close(out.delta_weight(module),
                                   plan.latest[0].delta_weight(module), rtol=1e-5, atol=1e-6)


def test_finiteness_is_checked_once_per_tensor(tmp_path, monkeypatch):
    import fedbip_hub.adapters.lora as adapter_io

    folder = write_raw_adapter(tmp_path / "a", r=2, seed=1)
    adapter = LoraAdapter(folder)
    checked = []
    real = torch.isfinite

    class Spy:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def isfinite(tensor):
            checked.append(tensor.numel())
            return real(tensor)

    monkeypatch.setattr(adapter_io, "torch", Spy())
    module = next(iter(adapter.modules))
    for _ in range(3):
        adapter.lora_factors(module)
        adapter.delta_factors(module, torch.float64)
    assert len(checked) == 2  # lora_A and lora_B, once each


def test_non_finite_tensors_are_still_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_raw_adapter(tmp_path / "a", r=2, seed=1)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    adapter = LoraAdapter(folder)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    for _ in range(2):  # refused on every read, not remembered as checked
        with pytest.raises(AdapterError, match="NaN or Inf"):
            adapter.lora_factors(module)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batched_equals_cpu_per_target():  # pragma: no cover - run where a GPU is lent
    jobs = _jobs()
    on_gpu = [[Part(p.key, p.coeff, p.u.cuda(), p.v.cuda()) for p in parts] for parts in jobs]
    cache = PairGrams()
    for parts, gpu_parts in zip(jobs, on_gpu, strict=True):
        a = merge_cached(parts, R, cache)
        (b,) = merge_batched([gpu_parts], R)
        assert b.u.device.type == "cpu"
        torch.testing.assert_close(b.u.double() @ b.v.double(), a.u.double() @ a.v.double(),
                                   rtol=1e-5, atol=1e-6)
