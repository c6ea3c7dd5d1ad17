"""Round-to-nearest: each group of a row on its own min-max grid, no data. The floor GPTQ must beat."""

from __future__ import annotations

import torch

from .quantizer import QuantSpec, grid_params, quantize_codes
from .result import QuantizedWeight
from .stats import ActivationStats


class RTN:
    """Round-to-nearest group-wise quantizer (ignores activation statistics)."""

    needs_stats = False

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, grid_search: bool = False,
                 **_: object) -> None:
        self.spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, grid_search=grid_search)

    def compress(self, weight: torch.Tensor, stats: ActivationStats | None = None) -> QuantizedWeight:
        """Quantize ``weight`` ``[N, K]``; returns codes ``[K, N]`` and ``[G, N]`` grids."""
        n, k = weight.shape
        group = self.spec.group(k)
        w = weight.to(torch.float32).reshape(n, k // group, group)
        scale, zero = grid_params(w.permute(1, 0, 2).reshape(-1, group), self.spec)  # [G*N]
        scales, zeros = scale.view(k // group, n), zero.view(k // group, n)
        codes = torch.clamp(torch.round(w / scales.t().unsqueeze(2)) + zeros.t().unsqueeze(2), 0, self.spec.maxq)
        return QuantizedWeight(codes.reshape(n, k).t().to(torch.uint8), scales, zeros, self.spec)


__all__ = ["RTN", "quantize_codes"]
