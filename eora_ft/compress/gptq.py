"""GPTQ (Frantar et al., 2022): column-by-column quantization with Hessian-weighted error feedback.

Follows the reference implementation (IST-DASLab/gptq ``fasterquant``): Hessian ``H = X^T X / n``
from the shared activation statistics, relative damping on the diagonal, dead inputs zeroed, the
upper Cholesky factor of ``H^-1``, lazy block updates, and the group grid chosen when the first
column of each group is reached (on the error-updated weights).
"""

from __future__ import annotations

import torch

from .quantizer import QuantSpec, grid_params, quantize_codes
from .result import QuantizedWeight
from .stats import ActivationStats


class GPTQ:
    """GPTQ quantizer over a linear's weight, using its input statistics as the Hessian."""

    needs_stats = True

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        **_: object,
    ) -> None:
        if not 0 < damp_percent < 1:
            raise ValueError(f"damp_percent={damp_percent} must lie in (0, 1)")
        self.spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
        self.damp_percent = damp_percent
        self.block_size = block_size

    def _inverse_hessian_factor(self, h: torch.Tensor) -> torch.Tensor:
        damp = self.damp_percent * torch.mean(torch.diag(h))
        h = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(h_inv, upper=True)

    def compress(self, weight: torch.Tensor, stats: ActivationStats) -> QuantizedWeight:
        """Quantize ``weight`` ``[N, K]`` given the input statistics; codes ``[K, N]``, grids ``[G, N]``."""
        n, k = weight.shape
        group = self.spec.group(k)
        w = weight.detach().to(torch.float64).clone()
        h = stats.covariance().to(w.device).clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        hinv = self._inverse_hessian_factor(h)

        codes = torch.zeros(n, k, dtype=torch.int64, device=w.device)
        scales = torch.zeros(k // group, n, dtype=torch.float64, device=w.device)
        zeros = torch.zeros_like(scales)
        maxq = self.spec.maxq
        scale = zero = None
        for i1 in range(0, k, self.block_size):
            i2 = min(i1 + self.block_size, k)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if col % group == 0:
                    # the grid sees this block's in-block updates, as when group == block size
                    window = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                    scale, zero = (t.to(torch.float64) for t in grid_params(window, self.spec))
                    scales[col // group], zeros[col // group] = scale, zero
                q = quantize_codes(w1[:, i], scale, zero, maxq)
                codes[:, col] = q.to(torch.int64)
                err = (w1[:, i] - scale * (q - zero)) / hinv1[i, i]
                w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
                err1[:, i] = err
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        return QuantizedWeight(codes.t().contiguous(), scales.to(torch.float32), zeros.to(torch.float32), self.spec)
