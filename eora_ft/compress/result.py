"""What a compressor returns for one linear: integer codes on a group-wise grid (+ optional mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import QuantSpec


@dataclass
class QuantizedWeight:
    """GPTQ-semantics quantized weight: ``W[n, k] = scales[g, n] * (codes[k, n] - zeros[g, n])``.

    Attributes:
        codes: int64 ``[K, N]`` in ``[0, 2**bits)``.
        scales: fp32 ``[G, N]``; zeros: fp32 ``[G, N]`` integer-valued zero points.
        mask: optional bool ``[N, K]`` of kept weights (2:4 sparsity); None = dense.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    mask: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 ``[N, K]``."""
        k = self.codes.shape[0]
        group = self.spec.group(k)
        g = torch.arange(k, device=self.codes.device) // group
        w = (self.scales[g] * (self.codes.to(torch.float32) - self.zeros[g])).t()
        return w if self.mask is None else w * self.mask
