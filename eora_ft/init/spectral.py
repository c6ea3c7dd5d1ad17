"""The top singular directions of a matrix from a Gram eigenproblem, and the inverse-free split into LoRA
factors: what EoRA, plain SVD and the activation-diagonal initializer share.

A full SVD of an ``[N, K]`` error (or a full eigendecomposition) computes ``min(N, K)`` directions where
an adapter keeps 16-128. The Gram on the smaller side has the same top eigenvectors, and only the top
``r`` of its eigenpairs are computed (block subspace iteration to a residual of 1e-9 of the largest
eigenvalue, the exact top-``r`` solver where that does not converge). Everything is fp64.
"""

from __future__ import annotations

import torch

from .factors import LowRankFactors


def gram_rtol(rtol: float, n: int) -> float:
    """Eigenvalues of an ``n x n`` Gram are exact to ~``n eps`` of the largest: its singular values to
    ``sqrt(n eps)``; smaller ones are indistinguishable from zero."""
    return max(rtol, (n * torch.finfo(torch.float64).eps) ** 0.5)


SUBSPACE_TOLERANCE = 1e-9  # residual ||G x - theta x|| of every kept Ritz pair, relative to the largest eigenvalue
SUBSPACE_MAX_ITERATIONS = 400


def top_eigenpairs(gram: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest eigenvalues (descending, ``[count]``) and eigenvectors (``[n, count]``) of the
    symmetric positive semi-definite fp64 ``gram`` ``[n, n]``, on its device.

    Small problems, or many pairs: one full eigendecomposition. Otherwise block subspace iteration with
    Rayleigh-Ritz (a block of ``2 count + 8`` vectors; each step one ``[n, n] x [n, block]`` product) until
    every kept pair's residual is below :data:`SUBSPACE_TOLERANCE` of the largest eigenvalue; if the
    spectrum is too flat for that within :data:`SUBSPACE_MAX_ITERATIONS` steps, the exact solver (LAPACK
    ``syevr`` for the top pairs only, through scipy on a CPU) decides."""
    n = gram.shape[0]
    count = min(count, n)
    if n <= 256 or count >= n // 4:
        values, vectors = torch.linalg.eigh(gram)
        return values[n - count:].flip(0), vectors[:, n - count:].flip(1)
    found = _subspace_iteration(gram, count)
    return found if found is not None else _exact_top(gram, count)


def _subspace_iteration(gram: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    n = gram.shape[0]
    block = min(n, 2 * count + 8)
    start = torch.randn(n, block, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis, _ = torch.linalg.qr(gram @ start.to(gram.device))
    for step in range(1, SUBSPACE_MAX_ITERATIONS + 1):
        image = gram @ basis
        if step % 10 == 0 or step == SUBSPACE_MAX_ITERATIONS:
            ritz_values, ritz_vectors = torch.linalg.eigh(basis.t() @ image)  # Rayleigh-Ritz, ascending
            values = ritz_values.flip(0)[:count]
            vectors = basis @ ritz_vectors.flip(1)[:, :count]
            residual = torch.linalg.norm(gram @ vectors - vectors * values, dim=0)
            if float(residual.max()) <= SUBSPACE_TOLERANCE * max(float(values[0]), torch.finfo(torch.float64).tiny):
                return values, vectors
        basis, _ = torch.linalg.qr(image)
    return None


def _exact_top(gram: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = gram.shape[0]
    if gram.device.type == "cpu":
        import numpy as np
        import scipy.linalg

        values, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - count, n - 1], driver="evr",
                                            check_finite=False)
        values, vectors = torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(np.ascontiguousarray(vectors))
    else:
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values[n - count:], vectors[:, n - count:]
    return values.flip(0), vectors.flip(1)


def top_left_singular(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors ``[N, r]`` and singular values ``[r]`` of ``m`` ``[N, K]`` from the
    Gram on its smaller side (``M M^T``, or ``M^T M`` with ``U = M V / S`` for a tall ``m``)."""
    if m.shape[0] <= m.shape[1]:
        top, u = top_eigenpairs(m @ m.t(), rank)
        return u, top.clamp_min(0.0).sqrt()
    top, v = top_eigenpairs(m.t() @ m, rank)
    s = top.clamp_min(0.0).sqrt()
    alive = s > gram_rtol(0.0, m.shape[1]) * s[0].clamp_min(torch.finfo(s.dtype).tiny)
    u = (m @ v) / torch.where(alive, s, torch.ones_like(s))
    return torch.where(alive, u, torch.zeros_like(u)), s


def alive_directions(top: torch.Tensor, s: torch.Tensor, rtol: float) -> torch.Tensor:
    """Which of the leading singular values ``top`` count as non-zero (relative to the largest)."""
    return top > rtol * s[0].clamp_min(torch.finfo(s.dtype).tiny)


def split_left(dw: torch.Tensor, u: torch.Tensor, s: torch.Tensor, rank: int, rtol: float) -> LowRankFactors:
    """``B = U_r S_r^1/2``, inverse-free ``A = S_r^-1/2 U_r^T dW`` (zero rows/columns for dead directions)."""
    keep = min(rank, s.shape[0])
    alive = alive_directions(s[:keep], s, rtol)
    s_root = torch.where(alive, s[:keep].sqrt(), torch.zeros_like(s[:keep]))
    inv_s_root = torch.where(alive, 1.0 / s[:keep].clamp_min(torch.finfo(s.dtype).tiny).sqrt(), torch.zeros_like(s[:keep]))
    b = torch.zeros(dw.shape[0], rank, dtype=torch.float64, device=dw.device)
    a = torch.zeros(rank, dw.shape[1], dtype=torch.float64, device=dw.device)
    b[:, :keep] = u[:, :keep] * s_root
    a[:keep] = inv_s_root.unsqueeze(1) * (u[:, :keep].t() @ dw)
    return finite(LowRankFactors(a.to(torch.float32), b.to(torch.float32), int(alive.sum())))


def finite(factors: LowRankFactors) -> LowRankFactors:
    if not (torch.isfinite(factors.a).all() and torch.isfinite(factors.b).all()):
        raise FloatingPointError("non-finite adapter factors; try eigen_mode='damp' or more calibration tokens")
    return factors
