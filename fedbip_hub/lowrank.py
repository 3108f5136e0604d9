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


def refactorize(u: torch.Tensor, v: torch.Tensor, rank: int | None, *, rtol: float = 1e-6
                ) -> Refactorized:
    """Best rank-``rank`` approximation of U·V (Eckart–Young), via QR and a small SVD.

    U = Q₁R₁, Vᵀ = Q₂R₂, R₁R₂ᵀ = XΣYᵀ; then U' = Q₁X_r√Σ_r and V' = √Σ_rY_rᵀQ₂ᵀ.

    Args:
        u: d_out×R.
        v: R×d_in.
        rank: the output rank; ``None`` keeps every singular value above ``rtol``·σ_max
            (the exact "cat" merge). A result of lower rank is padded with zeros.
        rtol: singular values below rtol·σ_max count as zero when ``rank`` is None.

    Returns:
        The factors, all singular values, and the discarded energy 1 − Σ_r σ²/Σ σ².
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
