"""Low-rank maths against brute force on materialised matrices (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from factories import brute_cosine
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbip_hub.engine.lowrank import cosine_from_gram, dense_gram, lowrank_gram, refactorize

F64 = torch.float64


def _factors(ranks, d_out=12, d_in=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    us = [torch.randn(d_out, r, generator=gen, dtype=F64) for r in ranks]
    vs = [torch.randn(r, d_in, generator=gen, dtype=F64) for r in ranks]
    return us, vs


def _brute_gram(mats):
    return torch.tensor([[float((a * b).sum()) for b in mats] for a in mats], dtype=F64)


@pytest.mark.parametrize("ranks", [[3, 5, 1], [2, 0, 4, 1], [7], [1, 1], [6, 8, 9]])
def test_lowrank_gram_matches_materialised_inner_products(ranks):
    us, vs = _factors(ranks)
    mats = [u @ v for u, v in zip(us, vs, strict=True)]
    gram = lowrank_gram(us, vs)
    assert gram.shape == (len(ranks), len(ranks))
    torch.testing.assert_close(gram, _brute_gram(mats), rtol=1e-12, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(0, 6), min_size=1, max_size=5),
       d_out=st.integers(1, 10), d_in=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_lowrank_gram_property(ranks, d_out, d_in, seed):
    us, vs = _factors(ranks, d_out, d_in, seed)
    mats = [u @ v for u, v in zip(us, vs, strict=True)]
    torch.testing.assert_close(lowrank_gram(us, vs), _brute_gram(mats), rtol=1e-10, atol=1e-9)


def test_dense_gram_matches_flattened_dot_products():
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(3, 4, generator=gen, dtype=F64) for _ in range(4)]
    torch.testing.assert_close(dense_gram(tensors), _brute_gram(tensors))


def test_cosine_from_gram_with_zero_vector():
    gen = torch.Generator().manual_seed(2)
    vecs = [torch.randn(20, generator=gen, dtype=F64) for _ in range(3)]
    vecs.insert(1, torch.zeros(20, dtype=F64))
    cos = cosine_from_gram(dense_gram(vecs))
    torch.testing.assert_close(cos, brute_cosine(vecs))
    assert cos[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert cos[:, 1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.all(cos.diagonal() == 1.0)
    assert not torch.isnan(cos).any()


def test_cosine_from_gram_signs_and_scale():
    v = torch.randn(10, dtype=F64)
    cos = cosine_from_gram(dense_gram([v, -3 * v, 2 * v]))
    expected = torch.tensor([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=F64)
    torch.testing.assert_close(cos, expected)


def _stacked(ranks, d_out=16, d_in=11, seed=3):
    us, vs = _factors(ranks, d_out, d_in, seed)
    return torch.cat(us, dim=1), torch.cat(vs, dim=0)


@pytest.mark.parametrize("extra", [0, 3])
def test_refactorize_exact_when_rank_covers_stacked_rank(extra):
    u, v = _stacked([2, 3, 1])
    stacked = u.shape[1]
    out = refactorize(u, v, stacked + extra)
    assert out.rank == stacked + extra
    assert out.u.shape == (16, stacked + extra) and out.v.shape == (stacked + extra, 11)
    torch.testing.assert_close(out.u @ out.v, u @ v, rtol=0, atol=1e-10)
    assert out.discarded_energy == pytest.approx(0.0, abs=1e-12)


def test_refactorize_exact_when_stacked_rank_exceeds_a_dimension():
    # ΣR = 12 > d_out = 5: the QR is of a wide matrix, the result still exact at rank 5+
    u, v = _stacked([4, 4, 4], d_out=5, d_in=9)
    out = refactorize(u, v, 12)
    torch.testing.assert_close(out.u @ out.v, u @ v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_refactorize_truncation_is_the_truncated_svd(rank):
    u, v = _stacked([3, 2, 4])  # rank 9 matrix, 16×11
    m = u @ v
    x, s, yt = torch.linalg.svd(m, full_matrices=False)
    best = x[:, :rank] @ torch.diag(s[:rank]) @ yt[:rank]
    out = refactorize(u, v, rank)
    assert out.rank == rank
    approx = out.u @ out.v
    torch.testing.assert_close(approx, best, rtol=0, atol=1e-9)
    err = torch.linalg.matrix_norm(m - approx)
    assert float(err) == pytest.approx(math.sqrt(float((s[rank:] ** 2).sum())), rel=1e-9)
    sv = torch.linalg.svdvals(m)
    expected_energy = 1 - float((sv[:rank] ** 2).sum()) / float((sv**2).sum())
    assert out.discarded_energy == pytest.approx(expected_energy, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(out.singular_values[:9], sv[:9], rtol=1e-9, atol=1e-9)


def test_refactorize_balanced_factors():
    """U' = Q₁X√Σ and V' = √ΣYᵀQ₂ᵀ: the factors carry equal norms per direction."""
    u, v = _stacked([3, 3])
    out = refactorize(u, v, 4)
    torch.testing.assert_close(out.u.norm(dim=0), out.v.norm(dim=1), rtol=1e-9, atol=1e-12)


def test_refactorize_cat_keeps_exactly_the_numerical_rank():
    gen = torch.Generator().manual_seed(4)
    u1, v1 = torch.randn(16, 3, generator=gen, dtype=F64), torch.randn(3, 11, generator=gen,
                                                                        dtype=F64)
    # the second client repeats client 1's column space and row space: stacked rank 7,
    # numerical rank 3 + 2 = 5
    u2 = torch.cat([u1 @ torch.randn(3, 2, generator=gen, dtype=F64),
                    torch.randn(16, 2, generator=gen, dtype=F64)], dim=1)
    v2 = torch.cat([torch.randn(2, 3, generator=gen, dtype=F64) @ v1,
                    torch.randn(2, 11, generator=gen, dtype=F64)], dim=0)
    u, v = torch.cat([u1, u2], dim=1), torch.cat([v1, v2], dim=0)
    m = u @ v
    out = refactorize(u, v, None)
    assert out.rank == int(torch.linalg.matrix_rank(m)) == 5 < u.shape[1]
    torch.testing.assert_close(out.u @ out.v, m, rtol=0, atol=1e-10)
    assert out.discarded_energy == pytest.approx(0.0, abs=1e-12)


def test_refactorize_cat_of_zero_is_a_padded_zero():
    u, v = torch.zeros(6, 3, dtype=F64), torch.zeros(3, 4, dtype=F64)
    out = refactorize(u, v, None)
    assert out.rank == 1
    assert torch.count_nonzero(out.u @ out.v) == 0
    assert out.discarded_energy == 0.0


def test_refactorize_pads_when_rank_exceeds_what_is_available():
    u, v = _stacked([2, 1], d_out=6, d_in=5)  # stacked rank 3
    out = refactorize(u, v, 8)
    assert out.u.shape == (6, 8) and out.v.shape == (8, 5)
    torch.testing.assert_close(out.u @ out.v, u @ v, rtol=0, atol=1e-10)
    assert torch.count_nonzero(out.u[:, 3:]) == 0
    assert torch.count_nonzero(out.v[3:]) == 0
    assert out.discarded_energy == pytest.approx(0.0, abs=1e-12)
