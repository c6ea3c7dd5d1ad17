"""Pure-torch reference of the packed-weight operations: the specification every kernel is tested
against, and the CPU path used in training.

Dequantization follows GPTQ semantics: ``W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n])`` with
``g = k // group_size``.
"""

from __future__ import annotations

import torch

from .packing import unpack_rows


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
    n = qweight.shape[1]
    group = in_features if group_size == -1 else group_size
    groups = in_features // group
    codes = unpack_rows(qweight, bits, in_features)  # uint8 [N, K]
    if bits < 8 and not zeros.is_floating_point():
        # q - z lies in (-16, 16): subtracted in place in int8 (a quarter of the bytes of an fp32 pass), then
        # one conversion writes W
        difference = codes.view(torch.int8)
        difference.view(n, groups, group).sub_(zeros.to(torch.int8).t()[:, :, None])
        weight = difference.to(dtype)
    else:
        weight = torch.empty(n, in_features, dtype=dtype, device=qweight.device).copy_(codes)
        weight.view(n, groups, group).sub_(zeros.to(torch.float32).t()[:, :, None])
    # (q - z) is exact in any float dtype (|q - z| < 256); the scaling computes in fp32 and rounds once to
    # ``dtype``: bit-equal to (q - z) * s in fp32
    weight.view(n, groups, group).mul_(scales.to(torch.float32).t()[:, :, None])
    return weight


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
