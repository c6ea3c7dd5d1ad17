"""Activation-diagonal SVD (ASVD / QERA-approx): weight the error's columns by ``sqrt(E[x^2])`` only.

The ablation between plain SVD (no data) and EoRA (full covariance): minimises
``||(dW - B A) D||_F`` with ``D = diag(sqrt(diag(C)))``. Solved with EoRA's inverse-free split on
the diagonal covariance, so inputs that never fire (``E[x^2] = 0``) cannot blow ``A`` up.
"""

from __future__ import annotations

import torch

from eora_ft.compress.stats import ActivationStats

from .eora import eora_factors
from .factors import LowRankFactors


def act_diag_factors(delta_w: torch.Tensor, stats: ActivationStats | torch.Tensor, rank: int) -> LowRankFactors:
    """Factors of ``delta_w`` ``[N, K]`` under the diagonal of the input covariance ``[K, K]``."""
    cov = stats.covariance() if isinstance(stats, ActivationStats) else stats.to(torch.float64)
    second_moments = torch.diag(cov)  # a diagonal covariance is its own eigendecomposition: no O(K^3) eigh
    return eora_factors(delta_w, (second_moments, torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)), rank)
