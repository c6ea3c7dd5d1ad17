"""Triton dequantization of packed codes into a dense ``[N, K]`` weight (GPTQ semantics).

``W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n])``, ``g = k // group_size``; codes packed along K
in int32 words (2/4/8-bit), 3-bit planar (a 2-bit plane then a 1-bit plane). Pruned 2:4 entries hold
the zero point, so they dequantize to exactly 0 with no mask. Writes into ``out`` when given (a
reused scratch buffer on the training path).

Import only where Triton can run: on a GPU, or on CPU with ``TRITON_INTERPRET=1`` set before import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packing import SUPPORTED_BITS


@triton.jit
def _codes(qweight_ptr, offs_k, offs_n, mask, N, K, BITS: tl.constexpr):
    if BITS == 3:
        low_words = tl.load(qweight_ptr + (offs_k // 16)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        high_words = tl.load(qweight_ptr + (K * 2 // 32 + offs_k // 32)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        low = (low_words >> ((offs_k % 16) * 2)[:, None]) & 3
        high = (high_words >> (offs_k % 32)[:, None]) & 1
        return low | (high << 2)
    PER_WORD: tl.constexpr = 32 // BITS
    words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    return (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)


@triton.jit
def _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, N, K, group_size, BITS: tl.constexpr):
    """A ``[BLOCK_K, BLOCK_N]`` tile of ``W_c^T`` in fp32 (zero outside the matrix)."""
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    codes = _codes(qweight_ptr, offs_k, offs_n, mask, N, K, BITS).to(tl.float32)
    group = offs_k // group_size
    scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    zero = tl.load(zeros_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    return scale * (codes - zero)


@triton.jit
def _dequant_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, group_size,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    weight = _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, N, K, group_size, BITS)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], weight.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
                      block_k: int = 64, block_n: int = 64) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (or into ``out``) from int32 ``qweight`` ``[K*bits/32, N]``,
    ``scales`` ``[G, N]`` and ``zeros`` ``[G, N]``; same result as :func:`kernels.reference.dequantize`."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: {SUPPORTED_BITS}")
    n = qweight.shape[1]
    group = in_features if group_size == -1 else group_size
    if out is None:
        out = torch.empty(n, in_features, dtype=dtype, device=qweight.device)
    elif out.shape != (n, in_features) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {in_features}] buffer, got {tuple(out.shape)}")
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, n, in_features, group,
                          BITS=bits, BLOCK_K=block_k, BLOCK_N=block_n)
    return out
