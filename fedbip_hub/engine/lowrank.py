"""Pure low-rank maths on factor pairs (ΔW = U·V): Gram matrices, cosines, re-factorisation.

Nothing here does I/O or forms a d_out×d_in matrix; every function is small and is
tested against brute force on materialised matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _block_indicator(ranks: Sequence[int], *, dtype: torch.dtype, device: torch.device
                     ) -> torch.Tensor:
    """K×ΣR matrix with a 1 where column j belongs to client k's block."""
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=device),
                                    torch.tensor(list(ranks), device=device))
    indicator = torch.zeros(len(ranks), int(sum(ranks)), dtype=dtype, device=device)
    indicator[owner, torch.arange(owner.numel(), device=device)] = 1
    return indicator


def lowrank_gram(us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix G[i,j] = ⟨U_i V_i, U_j V_j⟩_F of K low-rank matrices.

    Uses ⟨U₁V₁, U₂V₂⟩ = Σ (U₁ᵀU₂) ⊙ (V₁V₂ᵀ) on the stacked factors, at
    O((d_out+d_in)·(ΣR)²) cost.

    Args:
        us: K tensors, each d_out×R_k.
        vs: K tensors, each R_k×d_in.

    Returns:
        The K×K Gram matrix.
    """
    ranks = [u.shape[1] for u in us]
    u_cat = torch.cat(list(us), dim=1)
    v_cat = torch.cat(list(vs), dim=0)
    hadamard = (u_cat.T @ u_cat) * (v_cat @ v_cat.T)
    indicator = _block_indicator(ranks, dtype=hadamard.dtype, device=hadamard.device)
    return indicator @ hadamard @ indicator.T


def dense_gram(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix of K dense tensors of one shape, flattened."""
    flat = torch.stack([t.reshape(-1) for t in tensors])
    return flat @ flat.T


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine matrix from a Gram matrix; a zero vector has cosine 0 with all but itself."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny),
                      torch.zeros_like(gram))
    cos = cos.clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


@dataclass(frozen=True)
class Refactorized:
    """A rank-r factorisation U·V of a low-rank sum and what the truncation discarded."""

    u: torch.Tensor
    v: torch.Tensor
    singular_values: torch.Tensor
    discarded_energy: float

    @property
    def rank(self) -> int:
        return self.v.shape[0]


EPS64 = torch.finfo(torch.float64).eps
# A direction whose eigenvalue is below this many R·ε₆₄ of the largest one is rounding
# noise of a float64 Gram (its singular value is below ~√(R·ε₆₄) ≈ 2e-7 of the top one,
# under fp32 resolution): it is dropped rather than divided by.
NOISE_FACTOR = 1.0
# Cholesky-QR is used when the Gram's condition number, once its columns are equilibrated,
# is provably below this: the basis it gives is then orthonormal to about ε₆₄·κ ≤ 1e-9.
# Otherwise the eigendecomposition, which handles any rank.
ORTHONORMAL_TOL = 1e-9
CHOLESKY_MAX_COND = ORTHONORMAL_TOL / EPS64


@dataclass(frozen=True)
class GramCore:
    """The small part of a re-factorisation, from the fp64 Grams of stacked factors.

    For a batch of stacks (U, V) with Gu = UᵀU and Gv = VVᵀ, ``U @ wu`` and ``wv @ V``
    are the best rank-``t`` factors of U·V, balanced (each direction carries √σ on
    both sides); columns past ``keep`` are zero.

    Attributes:
        wu: (B, R, t).
        wv: (B, t, R).
        sigma: (B, R), the singular values of U·V, descending (noise-level ones are 0).
        keep: (B,), how many directions each item keeps.
        discarded: (B,), the discarded energy 1 − Σ_kept σ²/Σ σ².
    """

    wu: torch.Tensor
    wv: torch.Tensor
    sigma: torch.Tensor
    keep: torch.Tensor
    discarded: torch.Tensor


def _noise_floor(values: torch.Tensor) -> torch.Tensor:
    """Per item, the level under which eigenvalues (ascending, last is largest) of an
    R×R float64 Gram are rounding noise."""
    size = values.shape[-1]
    return values[..., -1:].clamp_min(0) * (NOISE_FACTOR * size * EPS64)


def _cholesky_accurate(gram: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Per item, whether Cholesky-QR of the stack behind ``gram`` is orthonormal to
    ``ORTHONORMAL_TOL``: its loss of orthogonality is about ε₆₄·κ of the column-equilibrated
    Gram G_eq = S⁻¹·Gu·S⁻¹ (S² = diag Gu; Cholesky does not depend on that scaling), and
    κ(G_eq) ≤ tr(G_eq)·‖L_eq⁻¹‖²_F = R·‖L⁻¹·S‖²_F, an upper bound at O(R²) given L⁻¹
    (no R×R×R check product)."""
    size = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    bound = size * (inverse * scale[..., None, :]).square().sum(dim=(-2, -1))
    return torch.isfinite(bound) & (bound <= CHOLESKY_MAX_COND)


def _basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T and C (both B×R×R) with U = (U·T)·C and U·T orthonormal, from Gu = UᵀU.

    Cholesky (Gu = LLᵀ, T = L⁻ᵀ, C = Lᵀ) where it is provably accurate
    (``_cholesky_accurate``); else the eigendecomposition Gu = PΛPᵀ with T = PΛ^-½ and
    C = Λ^½Pᵀ over the eigenvalues above the noise floor: duplicated, rank-deficient or
    zero factors lose their null directions instead of dividing by them.
    """
    size = gram.shape[-1]
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
    lower, info = torch.linalg.cholesky_ex(gram)
    ok = info == 0
    if bool(ok.all()):  # the common case: no per-item indexing
        inverse = torch.linalg.solve_triangular(lower, eye.expand_as(gram), upper=False)
        good = _cholesky_accurate(gram, inverse)
        if bool(good.all()):
            return inverse.mT, lower.mT
    t = torch.zeros_like(gram)
    c = torch.zeros_like(gram)
    if bool(ok.any()):
        inverse = torch.linalg.solve_triangular(lower[ok], eye.expand(int(ok.sum()), size, size),
                                                upper=False)
        accurate = _cholesky_accurate(gram[ok], inverse)
        good = torch.zeros_like(ok)
        good[ok] = accurate
        t[good] = inverse[accurate].mT
        c[good] = lower[good].mT
        ok = good
    bad = ~ok
    if bool(bad.any()):
        values, vectors = torch.linalg.eigh(gram[bad])
        kept = values > _noise_floor(values)
        root = values.clamp_min(0).sqrt()
        inv_root = torch.where(kept, 1.0 / torch.where(kept, root, 1.0), 0.0)
        t[bad] = vectors * inv_root[:, None, :]
        c[bad] = (vectors * torch.where(kept, root, 0.0)[:, None, :]).mT
    return t, c


def gram_core(gu: torch.Tensor, gv: torch.Tensor, rank: int | None, *, rtol: float = 1e-6
              ) -> GramCore:
    """Best rank-``rank`` re-factorisation of a batch of U·V from their fp64 Grams.

    With U = Q·C (``_basis``), U·V = Q·Z for Z = C·V, so the SVD of U·V is Q times that
    of Z, and Z's left singular vectors and σ² are the eigenpairs of ZZᵀ = C·Gv·Cᵀ. Then
    U' = U·T·X_r·√Σ_r and V' = √Σ_r⁻¹·X_rᵀ·C·V (Eckart–Young). The d-sized work is the
    two Grams and the two output products, O(d·R·r) beyond the Grams; the rest is
    O(R³). Float64 throughout: Grams square the conditioning, which fp32 cannot absorb
    (it loses three digits on near-duplicate clients), float64 can.

    Args:
        gu: (B, R, R), UᵀU in float64.
        gv: (B, R, R), VVᵀ in float64.
        rank: the output rank; ``None`` keeps every σ above ``rtol``·σ_max ("cat"),
            the widest item sets the width and the others are zero-padded.
        rtol: the relative cut for ``rank=None``.
    """
    t, c = _basis(gu)
    h = c @ gv @ c.mT
    ascending, vectors = torch.linalg.eigh((h + h.mT) / 2)
    values = ascending.flip(-1)  # descending
    resolved = values > _noise_floor(ascending)
    sigma = torch.where(resolved, values.clamp_min(0), 0.0).sqrt()
    if rank is None:
        keep = (resolved & (sigma > rtol * sigma[..., :1])).sum(dim=-1)
        width = max(int(keep.max()) if keep.numel() else 0, 1)
    else:
        keep = resolved.sum(dim=-1).clamp_max(rank)
        width = rank
    cols = min(width, gu.shape[-1])
    live = torch.arange(cols, device=gu.device) < keep[:, None]
    root = torch.where(live, sigma[..., :cols], 0.0).sqrt()
    inv_root = torch.where(live, 1.0 / torch.where(live, root, 1.0), 0.0)
    x = vectors[..., vectors.shape[-1] - cols:].flip(-1)  # the top ones only, descending
    wu = t @ (x * root[:, None, :])
    wv = (x * inv_root[:, None, :]).mT @ c
    if cols < width:  # pad: zero directions keep ΔW exact and the shapes PEFT expects
        wu = torch.cat([wu, wu.new_zeros(*wu.shape[:-1], width - cols)], dim=-1)
        wv = torch.cat([wv, wv.new_zeros(wv.shape[0], width - cols, wv.shape[-1])], dim=-2)
    energy = sigma**2
    total = energy.sum(dim=-1)
    kept = torch.where(torch.arange(energy.shape[-1], device=gu.device) < keep[:, None],
                       energy, 0.0).sum(dim=-1)
    discarded = torch.where(total > 0, 1.0 - kept / torch.where(total > 0, total, 1.0),
                            0.0).clamp_min(0.0)
    return GramCore(wu, wv, sigma, keep, discarded)


def refactorize(u: torch.Tensor, v: torch.Tensor, rank: int | None, *, rtol: float = 1e-6
                ) -> Refactorized:
    """Best rank-``rank`` approximation of U·V (Eckart–Young).

    Float64 inputs (the exactness-check compute dtype) go through QR
    (``refactorize_qr``), backward stable at float64; narrower ones through the float64
    Grams (``gram_core``), exact to their own precision and several times faster.

    Args:
        u: d_out×R.
        v: R×d_in.
        rank: the output rank; ``None`` keeps every singular value above ``rtol``·σ_max
            (the exact "cat" merge). A result of lower rank is padded with zeros.
        rtol: singular values below rtol·σ_max count as zero when ``rank`` is None.

    Returns:
        The factors (in the input dtype), the singular values, and the discarded energy
        1 − Σ_r σ²/Σ σ².
    """
    if u.dtype == torch.float64:
        return refactorize_qr(u, v, rank, rtol=rtol)
    u64, v64 = u.double(), v.double()
    core = gram_core((u64.T @ u64)[None], (v64 @ v64.T)[None], rank, rtol=rtol)
    width = rank if rank is not None else max(int(core.keep[0]), 1)
    return Refactorized((u64 @ core.wu[0, :, :width]).to(u.dtype),
                        (core.wv[0, :width] @ v64).to(v.dtype), core.sigma[0],
                        float(core.discarded[0]))


def refactorize_qr(u: torch.Tensor, v: torch.Tensor, rank: int | None, *, rtol: float = 1e-6
                   ) -> Refactorized:
    """``refactorize`` via QR and a small SVD, in the inputs' dtype.

    U = Q₁R₁, Vᵀ = Q₂R₂, R₁R₂ᵀ = XΣYᵀ; then U' = Q₁X_r√Σ_r and V' = √Σ_rY_rᵀQ₂ᵀ. O(d·R²)
    in QR, which is backward stable: the float64 path and the reference of the faster
    Gram path.
    """
    q1, r1 = torch.linalg.qr(u, mode="reduced")
    q2, r2 = torch.linalg.qr(v.T, mode="reduced")
    x, sigma, yt = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    if rank is None:
        keep = int((sigma > rtol * sigma.max()).sum()) if sigma.numel() and sigma.max() > 0 else 0
        target = max(keep, 1)
    else:
        keep = min(rank, sigma.numel())
        target = rank
    root = sigma[:keep].sqrt()
    u_out = (q1 @ x[:, :keep]) * root
    v_out = root[:, None] * (yt[:keep] @ q2.T)
    if keep < target:  # pad: zero directions keep ΔW exact and the shapes PEFT expects
        u_out = torch.cat([u_out, u_out.new_zeros(u_out.shape[0], target - keep)], dim=1)
        v_out = torch.cat([v_out, v_out.new_zeros(target - keep, v_out.shape[1])], dim=0)
    total = float((sigma**2).sum())
    discarded = 1.0 - float((sigma[:keep] ** 2).sum()) / total if total > 0 else 0.0
    return Refactorized(u_out, v_out, sigma, max(discarded, 0.0))
