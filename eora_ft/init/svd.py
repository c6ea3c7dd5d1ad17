"""Plain SVD of the compression error (ZeroQuant-V2 LoRC): no data, the ``C = I`` special case of EoRA."""

from __future__ import annotations

import torch

from .factors import LowRankFactors
from .spectral import gram_rtol, split_left, top_left_singular


def svd_factors(delta_w: torch.Tensor, rank: int) -> LowRankFactors:
    """Best rank-``rank`` approximation of ``delta_w`` ``[N, K]`` in Frobenius norm; A ``[rank, K]``, B ``[N, rank]``
    (fp32), split as ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T = S_r^-1/2 U_r^T dW``. The top directions come from
    the Gram on the smaller side (:mod:`.spectral`), not a full SVD."""
    dw = delta_w.to(torch.float64)
    u, s = top_left_singular(dw, rank)
    return split_left(dw, u, s, rank, gram_rtol(1e-10, min(dw.shape)))
