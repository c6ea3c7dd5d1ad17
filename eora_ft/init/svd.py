"""Plain SVD of the compression error (ZeroQuant-V2 LoRC): no data, the ``C = I`` special case of EoRA."""

from __future__ import annotations

import torch

from .factors import LowRankFactors, split_singular


def svd_factors(delta_w: torch.Tensor, rank: int) -> LowRankFactors:
    """Best rank-``rank`` approximation of ``delta_w`` ``[N, K]`` in Frobenius norm; A ``[rank, K]``, B ``[N, rank]``."""
    u, s, vh = torch.linalg.svd(delta_w.to(torch.float64), full_matrices=False)
    return split_singular(u, s, vh, rank)
