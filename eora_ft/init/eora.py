"""EoRA: the compression error projected into the eigenspace of the input activations, truncated by SVD.

Minimises ``||(dW - B A) X^T||_F`` over rank-``r`` products. With ``C = X^T X / n = Q L Q^T``
(fp64), take the SVD of ``dW Q L^1/2 = U S V^T``; the optimum is ``B A = U_r U_r^T dW``, split as
``B = U_r S_r^1/2`` and the inverse-free ``A = S_r^-1/2 U_r^T dW`` (no ``L^-1/2``, so vanishing
eigenvalues cannot blow it up). This equals the Cholesky-whitening optimum (SVD-LLM, QERA-exact, CLoQ).
"""

from __future__ import annotations

import torch

from eora_ft.compress.stats import ActivationStats

from .factors import LowRankFactors

EIGEN_MODES = ("inverse_free", "clamp", "damp")


def eora_factors(
    delta_w: torch.Tensor,
    cov: torch.Tensor | ActivationStats | tuple[torch.Tensor, torch.Tensor],
    rank: int,
    eigen_mode: str = "inverse_free",
    damp: float = 0.01,
    shrink: float = 0.0,
    rtol: float = 1e-10,
) -> LowRankFactors:
    """EoRA factors of ``delta_w`` ``[N, K]`` for covariance ``cov`` ``[K, K]`` (or the stats holding it, or
    its eigendecomposition ``(eigenvalues [K], eigenvectors [K, K])``).

    Args:
        eigen_mode: ``inverse_free`` (default; negatives from round-off clipped to 0), ``clamp`` (the
            reference code: non-positive eigenvalues replaced by the smallest positive one, and
            ``A = S^1/2 V^T L^-1/2 Q^T``), or ``damp`` (add ``damp * mean(L)`` to every eigenvalue).
        shrink: covariance shrinkage toward ``mean(L) * I``: 0 = EoRA, 1 = plain SVD of ``dW``.
    Returns ``A`` ``[rank, K]``, ``B`` ``[N, rank]`` (fp32).
    """
    if eigen_mode not in EIGEN_MODES:
        raise ValueError(f"eigen_mode={eigen_mode!r} is not valid; choose one of {EIGEN_MODES}")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink={shrink} must lie in [0, 1]")
    if isinstance(cov, ActivationStats):
        evals, evecs = cov.eigh()
    elif isinstance(cov, tuple):
        evals, evecs = (t.to(torch.float64) for t in cov)
    else:
        evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
    dw = delta_w.to(torch.float64).to(evecs.device)
    evals = evals.clamp_min(0.0)
    if shrink:
        evals = (1.0 - shrink) * evals + shrink * evals.mean()
    if eigen_mode == "damp":
        evals = evals + damp * evals.mean()
    elif eigen_mode == "clamp":
        positive = evals[evals > 0]
        floor = positive.min() if positive.numel() else torch.ones((), dtype=evals.dtype)
        evals = torch.where(evals > 0, evals, floor)

    root = evals.sqrt()
    u, s, vh = torch.linalg.svd((dw @ evecs) * root, full_matrices=False)
    keep = min(rank, s.shape[0])
    alive = s[:keep] > rtol * s[0].clamp_min(torch.finfo(s.dtype).tiny)
    s_root = torch.where(alive, s[:keep].sqrt(), torch.zeros_like(s[:keep]))
    inv_s_root = torch.where(alive, 1.0 / s[:keep].clamp_min(torch.finfo(s.dtype).tiny).sqrt(), torch.zeros_like(s[:keep]))

    b = torch.zeros(dw.shape[0], rank, dtype=torch.float64, device=dw.device)
    a = torch.zeros(rank, dw.shape[1], dtype=torch.float64, device=dw.device)
    b[:, :keep] = u[:, :keep] * s_root
    if eigen_mode == "clamp":
        a[:keep] = (s_root.unsqueeze(1) * vh[:keep]) / root @ evecs.t()
    else:
        a[:keep] = inv_s_root.unsqueeze(1) * (u[:, :keep].t() @ dw)
    factors = LowRankFactors(a.to(torch.float32), b.to(torch.float32), int(alive.sum()))
    if not (torch.isfinite(factors.a).all() and torch.isfinite(factors.b).all()):
        raise FloatingPointError("EoRA produced non-finite factors; try eigen_mode='damp' or more calibration tokens")
    return factors
