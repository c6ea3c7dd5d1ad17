"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

n:m (2:4, 4:8) or unstructured; with ``bits`` set, each kept weight is also quantized in the same
sweep (the paper's joint "SparseGPT + GPTQ" setting), pruned codes sitting at the zero point.
"""

from __future__ import annotations

import torch

from .obs import obs_sweep
from .prune import PruneSpec
from .quantizer import QuantSpec
from .result import QuantizedWeight, SparseWeight
from .stats import ActivationStats


class SparseGPT:
    """SparseGPT pruner (optionally joint with quantization) over a linear's input statistics."""

    needs_stats = True

    def __init__(self, sparsity: str | float = "2:4", bits: int | None = None, group_size: int = 128, sym: bool = False,
                 grid_search: bool = False, damp_percent: float = 0.01, block_size: int = 128, **_: object) -> None:
        if not 0 < damp_percent < 1:
            raise ValueError(f"damp_percent={damp_percent} must lie in (0, 1)")
        self.prune = PruneSpec.parse(sparsity)
        self.spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, grid_search=grid_search) if bits else None
        self.damp_percent, self.block_size = damp_percent, block_size

    def compress(self, weight: torch.Tensor, stats: ActivationStats) -> QuantizedWeight | SparseWeight:
        """Prune (and quantize) ``weight`` ``[N, K]``; the keep-mask is ``[N, K]`` bool."""
        result = obs_sweep(weight, stats.covariance(), overwrite_hessian=True,
                           quant=self.spec, prune=self.prune,
                           damp_percent=self.damp_percent, block_size=self.block_size)
        if self.spec is None:
            return SparseWeight(result.values.to(torch.float32), result.mask)
        return QuantizedWeight(result.codes.t().contiguous(), result.scales.to(torch.float32),
                               result.zeros.to(torch.float32), self.spec, mask=result.mask)
