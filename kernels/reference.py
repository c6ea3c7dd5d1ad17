"""Pure-torch reference of the packed-weight operations: the specification every kernel is tested
against, and the CPU path used in training.

Dequantization follows GPTQ semantics: ``W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n])`` with
``g = k // group_size``.
"""

from __future__ import annotations

import torch

from .packing import unpack_codes


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weight ``[N, K]`` in ``dtype`` from packed codes.

    Args:
        qweight: int32 ``[K * bits / 32, N]`` (see ``packing``).
        scales: float ``[G, N]``, ``G = K / group_size`` (``G = 1`` for per-channel).
        zeros: integer or float ``[G, N]`` zero points (in code units). Pruned weights hold the zero
            point and come out exactly 0: no mask is needed.
    """
    codes = unpack_codes(qweight, bits, in_features, dtype=torch.int32)  # [K, N]
    group = in_features if group_size == -1 else group_size
    n = codes.shape[1]
    grouped = codes.view(in_features // group, group, n).to(torch.float32)  # broadcast the [G, N] grids
    weight = ((grouped - zeros.to(torch.float32)[:, None, :]) * scales.to(torch.float32)[:, None, :]).view(in_features, n).t()
    return weight.to(dtype).contiguous()


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + scaling * (x A^T) B^T (+ bias)``; x ``[..., K]``, W ``[N, K]``, A ``[r, K]``, B ``[N, r]``."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)
