"""Seeded truncated SVD for LoRA-XS / LoRA-SB initialisation.

Papers: *LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters* (https://arxiv.org/abs/2405.17604,
code https://github.com/MohammadrezaBanaei/LoRA-XS) and *Initialization using Update Approximation is a Silver Bullet
for Extremely Efficient Low-Rank Fine-Tuning* (LoRA-SB, https://arxiv.org/abs/2411.19557, code
https://github.com/RaghavSinghal10/lora-sb).

The official code uses scikit-learn's ``TruncatedSVD(n_iter=10, random_state=42)`` (LoRA-XS) and
``torch.svd_lowrank(q=r, niter=10)`` (LoRA-SB, which draws its random test matrix from the *global* RNG although it
seeds it just before for an unused tensor). Here the randomized range finder takes a local ``torch.Generator``, so the
global RNG is never touched and the factors are reproducible, and it oversamples like scikit-learn (``q = r +
oversample``) so the rank-r truncation is accurate even for the flat spectra of sign matrices.
"""

from __future__ import annotations

from typing import Optional

import torch


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of every left singular vector is positive
    (the SVD is only defined up to these signs; this makes the factors deterministic)."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(1)


def low_rank_svd(
    M: torch.Tensor,
    rank: int,
    niter: Optional[int] = 10,
    oversample: int = 10,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``M ≈ U·diag(S)·Vh`` in float32 (for LoRA-XS / LoRA-SB,
    ).

    ``niter=None`` computes the exact SVD (``torch.linalg.svd``); otherwise a randomized range finder with
    ``rank + oversample`` test vectors drawn on the CPU from ``generator`` and ``niter`` power iterations (QR
    re-orthogonalised), as in Halko et al. 2011. The exact SVD is also used whenever ``rank + oversample`` reaches
    ``min(M.shape)``. Signs are normalised (largest entry of each column of ``U`` positive).

    Returns ``U`` (m×rank), ``S`` (rank,), ``Vh`` (rank×n), all float32 on ``M``'s device."""
    M = M.detach().float()
    m, n = M.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"low_rank_svd: rank must be in 1..min(m, n) = {min(m, n)}; got {rank}.")
    k = rank + oversample
    if niter is None or k >= min(m, n):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    else:
        omega = torch.randn((n, k), generator=generator, dtype=torch.float32).to(M.device)
        Q = torch.linalg.qr(M @ omega).Q
        for _ in range(niter):
            Q = torch.linalg.qr(M.T @ Q).Q
            Q = torch.linalg.qr(M @ Q).Q
        Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
        U = Q @ Ub
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    U, Vh = _fix_signs(U, Vh)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def random_orthonormal(rows: int, cols: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A ``rows×cols`` float32 CPU matrix with orthonormal columns (``rows >= cols``), from a seeded Gaussian's QR."""
    g = torch.randn((rows, cols), generator=generator, dtype=torch.float32)
    Q, Rq = torch.linalg.qr(g)
    return Q * torch.sign(torch.diagonal(Rq)).where(torch.diagonal(Rq) != 0, torch.ones(cols))
