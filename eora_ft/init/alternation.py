"""The alternation LoftQ and eora_alt share: ``Q_t = compress(W - B_{t-1} A_{t-1})``, ``B_t A_t = factor(W - Q_t)``.

Neither is monotone with a min-max grid (the grid moves with ``W - B A``), so the iterate with the
lowest objective is kept, with its ``Q_t`` as ``.base``.
"""

from __future__ import annotations

from typing import Callable

import torch

from eora_ft.compress.stats import ActivationStats

from .factors import LowRankFactors


def best_alternation(weight: torch.Tensor, compressor, stats: ActivationStats | None, iters: int,
                     factor: Callable[[torch.Tensor], LowRankFactors],
                     objective: Callable[[torch.Tensor, LowRankFactors], float],
                     start: tuple[torch.Tensor, LowRankFactors] | None = None,
                     history: list[float] | None = None) -> LowRankFactors | None:
    """Run ``iters`` alternations on ``weight`` ``[N, K]`` (fp32 on its device) and return the best iterate.

    ``factor(residual [N, K]) -> LowRankFactors``; ``objective(residual, factors) -> float`` (lower is
    better). ``start``: iterate 0 as ``(residual, factors)`` without a base of its own (kept with
    ``.base = None`` when it stays best), or None to start from ``B A = 0``. ``history`` receives every
    iterate's objective in order."""
    weight = weight.to(torch.float32)
    best, best_objective, correction = None, float("inf"), torch.zeros_like(weight)
    if start is not None:
        residual, best = start
        best_objective = objective(residual, best)
        correction = best.delta().to(weight.device)
        if history is not None:
            history.append(best_objective)
    for _ in range(iters):
        base = compressor.compress(weight - correction, stats)
        residual = weight - base.dequantize()
        factors = factor(residual)
        value = objective(residual, factors)
        if history is not None:
            history.append(value)
        if value < best_objective:
            factors.base = base
            best, best_objective = factors, value
        correction = factors.delta().to(weight.device)
    return best
