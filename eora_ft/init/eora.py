"""EoRA: the compression error projected into the eigenspace of the input activations, truncated by SVD.

Minimises ``||(dW - B A) X^T||_F`` over rank-``r`` products. With ``C = X^T X / n = Q L Q^T``
(fp64), take the SVD of ``dW Q L^1/2 = U S V^T``; the optimum is ``B A = U_r U_r^T dW``, split as
``B = U_r S_r^1/2`` and the inverse-free ``A = S_r^-1/2 U_r^T dW`` (no ``L^-1/2``, so vanishing
eigenvalues cannot blow it up). This equals the Cholesky-whitening optimum (SVD-LLM, QERA-exact, CLoQ).

Two routes to the same ``U_r, S_r`` (fp64 both):
- ``input`` side: the ``K x K`` eigendecomposition of ``C`` (cached on the statistics and shared by
  every linear reading that input: gate/up), then ``M = dW Q L^1/2`` and the top eigenpairs of its
  Gram on the smaller side (``M^T M``, ``K x K``, for a wide output: ``U_r = M V_r / S_r``);
- ``output`` side: ``U_r`` and ``S_r^2`` are the top eigenpairs of the ``N x N`` matrix ``dW C dW^T``,
  no ``K x K`` eigendecomposition at all. For a down projection (``N = 4096 < K = 14336`` in Llama-3-8B)
  this skips a 14336 x 14336 fp64 eigendecomposition (1.6 GB, minutes on a CPU).
``side="auto"`` takes the output side when ``N <= K`` and no decomposition of ``C`` is cached yet (q, k,
v, o, down in Llama), else the input side (gate/up share one decomposition). Only the top ``r``
eigenpairs of a Gram are computed (LAPACK's ``syevr`` through scipy on a CPU: the tridiagonal reduction
and ``r`` eigenvectors instead of all of them). A Gram squares the singular values, so directions
below ``sqrt(n eps)`` of the largest count as dead; the EoRA objective is unaffected at that level
(tests/init/test_eora.py: the objective equals the fp64 full-SVD optimum to 1e-6 relative where the
subspace iteration runs, and both routes agree with each other and with brute force). The
reference's ``clamp`` mode, which needs the right singular vectors, keeps the full SVD.
"""

from __future__ import annotations

import torch

from eora_ft.compress.stats import ActivationStats

from .factors import LowRankFactors
from .spectral import alive_directions, finite, gram_rtol, split_left, top_eigenpairs, top_left_singular

EIGEN_MODES = ("inverse_free", "clamp", "damp")
SIDES = ("auto", "input", "output")


def eora_factors(
    delta_w: torch.Tensor,
    cov: torch.Tensor | ActivationStats | tuple[torch.Tensor, torch.Tensor],
    rank: int,
    eigen_mode: str = "inverse_free",
    damp: float = 0.01,
    shrink: float = 0.0,
    rtol: float = 1e-10,
    side: str = "auto",
) -> LowRankFactors:
    """EoRA factors of ``delta_w`` ``[N, K]`` for covariance ``cov`` ``[K, K]`` (or the stats holding it, or
    its eigendecomposition ``(eigenvalues [K], eigenvectors [K, K])``), on ``delta_w``'s device.

    Args:
        eigen_mode: ``inverse_free`` (default; negatives from round-off clipped to 0), ``clamp`` (the
            reference code: non-positive eigenvalues replaced by the smallest positive one, and
            ``A = S^1/2 V^T L^-1/2 Q^T``; input side only), or ``damp`` (add ``damp * mean(L)`` to every
            eigenvalue).
        shrink: covariance shrinkage toward ``mean(L) * I``: 0 = EoRA, 1 = plain SVD of ``dW``.
        side: ``input``, ``output`` or ``auto`` (see the module docstring); the factors agree to round-off.
    Returns ``A`` ``[rank, K]``, ``B`` ``[N, rank]`` (fp32).
    """
    if eigen_mode not in EIGEN_MODES:
        raise ValueError(f"eigen_mode={eigen_mode!r} is not valid; choose one of {EIGEN_MODES}")
    if side not in SIDES:
        raise ValueError(f"side={side!r} is not valid; choose one of {SIDES}")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink={shrink} must lie in [0, 1]")
    if side == "auto":
        cached = isinstance(cov, tuple) or (isinstance(cov, ActivationStats) and cov.has_eigh)
        side = "output" if delta_w.shape[0] <= delta_w.shape[1] and eigen_mode != "clamp" and not cached else "input"
    if side == "output":
        if eigen_mode == "clamp" or isinstance(cov, tuple):
            raise ValueError("side='output' needs the covariance itself and eigen_mode inverse_free or damp")
        dw = delta_w.to(torch.float64)
        u, s = _output_side(dw, cov, shrink, damp if eigen_mode == "damp" else 0.0, rank)
        return split_left(dw, u, s, rank, gram_rtol(rtol, dw.shape[0]))
    return _input_side(delta_w, cov, rank, eigen_mode, damp, shrink, rtol)


def _output_side(dw: torch.Tensor, cov: torch.Tensor | ActivationStats, shrink: float, damp: float,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of ``dW C' dW^T`` (``[N, N]`` fp64), ``C'`` the shrunk / damped covariance:
    ``U_r`` ``[N, r]`` and the singular values ``S_r`` ``[r]`` of ``dW Q L'^1/2``, descending."""
    if isinstance(cov, ActivationStats):
        xtx, tokens = cov.xtx, cov.tokens  # C = X^T X / n without materialising a scaled copy
        if tokens == 0:
            raise ValueError("no calibration tokens were accumulated for this input")
    else:
        xtx, tokens = cov.to(torch.float64), 1
    xtx = xtx.to(dw.device)
    gram = (dw @ xtx) @ dw.t() / tokens  # [N, N]
    mean_eigenvalue = float(torch.diagonal(xtx).sum()) / (tokens * xtx.shape[0])  # trace(C) / K
    # shrinkage then damping, as on the eigenvalues: L' = (1-s) L + s m, then + damp * m (mean(L') = m)
    identity_weight = (shrink + damp) * mean_eigenvalue
    if shrink or damp:
        gram = (1.0 - shrink) * gram + identity_weight * (dw @ dw.t())
    top, vectors = top_eigenpairs(gram, rank)
    return vectors, top.clamp_min(0.0).sqrt()


def _input_side(delta_w, cov, rank, eigen_mode, damp, shrink, rtol) -> LowRankFactors:
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
        floor = positive.min() if positive.numel() else torch.ones((), dtype=evals.dtype, device=evals.device)
        evals = torch.where(evals > 0, evals, floor)

    root = evals.sqrt()
    whitened = (dw @ evecs) * root  # M = dW Q L^1/2 [N, K]
    if eigen_mode != "clamp":
        return split_left(dw, *top_left_singular(whitened, rank), rank, gram_rtol(rtol, min(whitened.shape)))
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    keep = min(rank, s.shape[0])
    alive = alive_directions(s[:keep], s, rtol)
    s_root = torch.where(alive, s[:keep].sqrt(), torch.zeros_like(s[:keep]))
    b = torch.zeros(dw.shape[0], rank, dtype=torch.float64, device=dw.device)
    a = torch.zeros(rank, dw.shape[1], dtype=torch.float64, device=dw.device)
    b[:, :keep] = u[:, :keep] * s_root
    a[:keep] = (s_root.unsqueeze(1) * vh[:keep]) / root @ evecs.t()
    return finite(LowRankFactors(a.to(torch.float32), b.to(torch.float32), int(alive.sum())))
