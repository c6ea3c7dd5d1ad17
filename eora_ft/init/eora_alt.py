"""EoRA alternated with the run's own compressor: the data-aware LoftQ (CLoQ and QERA point this way).

Iterate 0 is plain EoRA on the plain compression error ``W - Q_0``. Iterate ``t`` compresses
``W - B_{t-1} A_{t-1}`` with the run's compressor and the layer's statistics (GPTQ with its Hessian),
then takes EoRA of the new error ``W - Q_t``. The iterate with the lowest calibration objective
``||(W - Q_t - B_t A_t) X^T||_F`` is kept; when it is not iterate 0, its ``Q_t`` becomes the run's base
(``.base``, as LoftQ's ``Q_T``), so ``iters = 0`` is exactly ``eora``.
"""

from __future__ import annotations

import torch

from eora_ft.compress.stats import ActivationStats

from .alternation import best_alternation
from .eora import eora_factors
from .factors import LowRankFactors


def _objective(residual: torch.Tensor, factors: LowRankFactors, stats: ActivationStats) -> float:
    error = residual.to(torch.float64) - factors.delta().to(torch.float64)
    return float((error @ stats.xtx.to(error.device)).mul_(error).sum())  # ||E X^T||^2 = tr(E X^T X E^T)


def eora_alt_factors(weight: torch.Tensor, delta_w: torch.Tensor, compressor, stats: ActivationStats, rank: int,
                     iters: int = 2, history: list[float] | None = None, **eora_options) -> LowRankFactors:
    """EoRA factors ``A`` ``[rank, K]``, ``B`` ``[N, rank]`` (fp32) of the best of ``iters + 1`` iterates;
    ``.base`` holds that iterate's compressed weight when it is not the plain compression ``W - delta_w``.

    ``history``, if given, receives the objective of every iterate (iterate 0 first)."""
    if iters < 0:
        raise ValueError(f"eora_alt iters={iters} must be >= 0 (0 = eora)")
    residual = delta_w.to(torch.float32)
    return best_alternation(weight, compressor, stats, iters,
                            factor=lambda residual: eora_factors(residual, stats, rank, **eora_options),
                            objective=lambda residual, factors: _objective(residual, factors, stats),
                            start=(residual, eora_factors(residual, stats, rank, **eora_options)), history=history)
