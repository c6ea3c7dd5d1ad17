"""GPTQ (Frantar et al., 2022): column-by-column quantization with Hessian-weighted error feedback.

Follows the reference implementation (IST-DASLab/gptq ``fasterquant``) through the shared sweep in
:mod:`.obs`: Hessian ``H = X^T X / n`` from the activation statistics, relative damping, dead inputs
zeroed, the upper Cholesky factor of ``H^-1``, lazy block updates. Act-order with static groups by default
(GPTQModel's ``desc_act`` and llm-compressor's ``static`` default too; on the bundled model it lowers held-out
perplexity at 2 and 3 bits, BENCHMARKS.md): columns visited by decreasing Hessian diagonal, each group's grid
fixed from the unvisited weight, so the codes keep the original column order. Without it, each group's grid
is chosen when the sweep reaches the group's first column.
"""

from __future__ import annotations

import torch

from .obs import obs_sweep
from .quantizer import QuantSpec
from .result import QuantizedWeight
from .stats import ActivationStats


class GPTQ:
    """GPTQ quantizer over a linear's weight, using its input statistics as the Hessian."""

    needs_stats = True

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, grid_search: bool = False,
                 damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True, **_: object) -> None:
        if not 0 < damp_percent < 1:
            raise ValueError(f"damp_percent={damp_percent} must lie in (0, 1)")
        self.spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, grid_search=grid_search)
        self.damp_percent, self.block_size, self.act_order = damp_percent, block_size, act_order

    def compress(self, weight: torch.Tensor, stats: ActivationStats) -> QuantizedWeight:
        """Quantize ``weight`` ``[N, K]`` given the input statistics; codes ``[K, N]``, grids ``[G, N]``."""
        result = obs_sweep(weight, stats.covariance(), overwrite_hessian=True,
                           quant=self.spec, damp_percent=self.damp_percent,
                           block_size=self.block_size, act_order=self.act_order)
        return QuantizedWeight(result.codes.t().contiguous(), result.scales.to(torch.float32),
                               result.zeros.to(torch.float32), self.spec)
