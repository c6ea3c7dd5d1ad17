"""Activation-diagonal SVD (ASVD / QERA-approx): weight the error's columns by ``sqrt(E[x^2])`` only.

The ablation between plain SVD (no data) and EoRA (full covariance): minimises
``||(dW - B A) D||_F`` with ``D = diag(sqrt(diag(C)))``. Solved with EoRA's inverse-free split on
the diagonal covariance, so inputs that never fire (``E[x^2] = 0``) cannot blow ``A`` up. A diagonal
covariance is its own eigendecomposition (eigenvectors: the identity), so nothing ``K x K`` is formed:
the diagonal is read through a view and ``dW Q L^1/2`` is ``dW`` with its columns scaled.
"""

from __future__ import annotations

import torch

from eora_ft.compress.stats import ActivationStats

from .factors import LowRankFactors
from .spectral import gram_rtol, split_left, top_left_singular

RTOL = 1e-10  # EoRA's default: singular values below this fraction of the largest count as dead


def act_diag_factors(delta_w: torch.Tensor, stats: ActivationStats | torch.Tensor, rank: int) -> LowRankFactors:
    """Factors ``A`` ``[rank, K]``, ``B`` ``[N, rank]`` (fp32) of ``delta_w`` ``[N, K]`` under the diagonal of the
    input covariance (``stats``, or the covariance ``[K, K]`` itself), computed on the statistics' device in fp64.
    Equal to :func:`eora_ft.init.eora.eora_factors` given ``(diag(C), I)`` as the eigendecomposition."""
    if isinstance(stats, ActivationStats):
        second_moments = stats.second_moments()
    else:
        second_moments = stats.diagonal().to(torch.float64)
    dw = delta_w.to(torch.float64).to(second_moments.device)
    whitened = dw * second_moments.clamp_min(0.0).sqrt()  # dW Q L^1/2 with Q = I
    return split_left(dw, *top_left_singular(whitened, rank), rank, gram_rtol(RTOL, min(whitened.shape)))
