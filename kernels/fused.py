"""Small-M fused kernels: dequantize inside the K loop, the LoRA term as one extra K slab.

Forward  ``y[M, N] = x W_c^T + (s x A^T) B^T (+ bias)``: the dense ``W_c`` is never written out; the
LoRA term is the slab ``[s U | B^T]`` with ``U = x A^T`` (``[M, r]``, computed first, tiny).
Twin     ``dX[M, K] = dY W_c + (s dY B) A``: the same tiles transposed, looping over N.
For generation and evaluation (M up to a few dozen tokens); training uses dequantize + matmul.
Import only where Triton runs (GPU, or ``TRITON_INTERPRET=1`` set before import on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import _weight_tile


@triton.jit
def _fused_forward_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
                          M, N, K, R, group_size, HAS_BIAS: tl.constexpr, BITS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0).to(tl.float32)
        acc += tl.dot(x, _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, N, K, group_size, BITS))
    offs_r = tl.arange(0, BLOCK_R)  # the LoRA slab: (s U) [M, r] times B^T [r, N]
    u = tl.load(u_ptr + offs_m[:, None] * R + offs_r[None, :], mask=(offs_m < M)[:, None] & (offs_r < R)[None, :], other=0)
    b_t = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None], mask=(offs_r < R)[:, None] & (offs_n < N)[None, :], other=0)
    acc += tl.dot(u.to(tl.float32), b_t.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _fused_grad_input_kernel(dy_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_ptr, a_ptr, dx_ptr,
                             M, N, K, R, group_size, BITS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                     mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], other=0).to(tl.float32)
        w_t = _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, N, K, group_size, BITS)  # [BK, BN]
        acc += tl.dot(dy, tl.trans(w_t))
    offs_r = tl.arange(0, BLOCK_R)  # slab: (s dY B) [M, r] times A [r, K]
    g = tl.load(g_ptr + offs_m[:, None] * R + offs_r[None, :], mask=(offs_m < M)[:, None] & (offs_r < R)[None, :], other=0)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=(offs_r < R)[:, None] & (offs_k < K)[None, :], other=0)
    acc += tl.dot(g.to(tl.float32), a.to(tl.float32))
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs inner dims of at least 16


def fused_forward(x: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, u: torch.Tensor | None = None,
                  block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``x`` ``[M, K]`` -> ``y`` ``[M, N]`` (dtype of ``x``) without materialising ``W_c``; pass ``u = x A^T``
    ``[M, r]`` if the caller already has it (the autograd function keeps it for backward)."""
    m, k = x.shape
    n, rank = qweight.shape[1], lora_a.shape[0]
    x = x.contiguous()
    if u is None:
        u = x.float() @ lora_a.float().t()
    u = (scaling * u.float()).contiguous()  # [M, r]: the LoRA slab's left operand
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    group = k if group_size == -1 else group_size
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fused_forward_kernel[grid](x, qweight, scales, zeros, u, lora_b.contiguous(), bias if bias is not None else x, y,
                                m, n, k, rank, group, HAS_BIAS=bias is not None, BITS=bits, BLOCK_M=block_m,
                                BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(rank))
    return y


def fused_grad_input(grad_y: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int, in_features: int,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                     block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``dY`` ``[M, N]`` -> ``dX`` ``[M, K]`` = ``dY W_c + s (dY B) A`` without materialising ``W_c``."""
    m, n = grad_y.shape
    rank = lora_a.shape[0]
    grad_y = grad_y.contiguous()
    g = (scaling * (grad_y.float() @ lora_b.float())).contiguous()  # [M, r]
    dx = torch.empty(m, in_features, dtype=grad_y.dtype, device=grad_y.device)
    group = in_features if group_size == -1 else group_size
    grid = (triton.cdiv(m, block_m), triton.cdiv(in_features, block_k))
    _fused_grad_input_kernel[grid](grad_y, qweight, scales, zeros, g, lora_a.contiguous(), dx, m, n, in_features, rank,
                                   group, BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                   BLOCK_R=_block_r(rank))
    return dx
