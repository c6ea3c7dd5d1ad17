"""What a compressor returns for one linear. Every kind can dequantize and build its frozen module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quantizer import QuantSpec


@dataclass
class QuantizedWeight:
    """GPTQ-semantics quantized weight: ``W[n, k] = scales[g, n] * (codes[k, n] - zeros[g, n])``.

    Attributes:
        codes: integer ``[K, N]`` (uint8 from the compressors) in ``[0, 2**bits)``; pruned entries (if
            ``mask``) hold the zero point.
        scales: fp32 ``[G, N]``; zeros: fp32 ``[G, N]`` integer-valued zero points.
        mask: optional bool ``[N, K]`` of kept weights (2:4 / unstructured sparsity); None = dense.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    mask: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 ``[N, K]``."""
        k = self.codes.shape[0]
        g = torch.arange(k, device=self.codes.device) // self.spec.group(k)
        w = (self.scales[g] * (self.codes.to(torch.float32) - self.zeros[g])).t()
        return w if self.mask is None else w * self.mask

    def to_module(self, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
        from .linear import CompressedLinear

        return CompressedLinear.from_quantized(self, bias, dtype=dtype)


@dataclass
class SparseWeight:
    """A pruned, unquantized weight: dense values ``[N, K]`` (fp32) with zeros where ``mask`` is False."""

    weight: torch.Tensor
    mask: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return (self.weight * self.mask).to(torch.float32)

    def to_module(self, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
        from .linear import CompressedLinear

        return CompressedLinear.from_sparse(self, bias, dtype=dtype)
