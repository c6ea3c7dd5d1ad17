"""PiSSA as QPiSSA (Meng et al., 2024; PEFT's ``init_lora_weights="pissa"``): the adapter takes the weight's
principal part and the frozen base the rest.

``B A = SVD_r(W)`` (``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T``, as PEFT splits it) and the base is the run's compressor
applied to the residual, ``Q = compress(W - B A)`` (with the layer's statistics when it uses them), so
``W ~= Q + B A``. Removing the largest singular directions narrows the residual's range, which is what makes
it quantize better than ``W`` (the paper's QPiSSA argument); the adapter starts as the principal part of the
model, not as a correction of a compression error. Like LoftQ it brings its own base (``.base``), and it is
LoftQ's ``iters = 1`` with the SVD taken before the compression instead of after.
"""

from __future__ import annotations

import torch

from eora_ft.compress.stats import ActivationStats

from .factors import LowRankFactors
from .svd import svd_factors


def pissa_factors(weight: torch.Tensor, compressor, stats: ActivationStats | None, rank: int) -> LowRankFactors:
    """Principal rank-``rank`` factors of ``weight`` ``[N, K]`` (A ``[rank, K]``, B ``[N, rank]``, fp32, on
    ``weight``'s device) with ``.base`` = ``compressor`` applied to ``W - B A``."""
    weight = weight.to(torch.float32)
    factors = svd_factors(weight, rank)
    factors.base = compressor.compress(weight - factors.delta().to(weight.device), stats)
    return factors
