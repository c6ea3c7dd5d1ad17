"""``y = x W_c^T + s (x A^T) B^T`` and its backward over a frozen packed ``W_c``, as one autograd function.

Large-M (training) path: dequantize ``W_c`` (Triton into a scratch buffer on GPU, the pure-torch
reference on CPU), one dense matmul, and the LoRA term with ``U = x A^T`` saved in forward. The
backward reads ``dY`` once for ``G = dY B`` and ``dB = s dY^T U``; ``dX = dY W_c + s G A``,
``dA = s G^T x``; ``W_c`` gets no gradient. The small-M fused kernel (dequantize inside the K loop)
plugs in behind the same function later.
"""

from __future__ import annotations

from typing import Callable

import torch


class PackedLoraMatmul(torch.autograd.Function):
    """Inputs: ``x`` ``[..., K]``, a zero-argument ``weight_fn`` returning ``W_c`` ``[N, K]`` (recomputed in
    backward instead of saved), ``A`` ``[r, K]``, ``B`` ``[N, r]``, ``scaling``, optional ``bias`` ``[N]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fn: Callable[[], torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, bias: torch.Tensor | None) -> torch.Tensor:
        weight = weight_fn().to(x.dtype)
        u = x @ lora_a.to(x.dtype).t()  # [..., r]
        y = x @ weight.t() + scaling * (u @ lora_b.to(x.dtype).t())
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x, u, lora_a, lora_b)
        ctx.weight_fn, ctx.scaling = weight_fn, scaling
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, u, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        g = grad_y2 @ lora_b.to(grad_y.dtype)  # [M, r]: the one extra read of dY besides dB
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight_fn().to(grad_y.dtype)
            grad_x = (grad_y2 @ weight + s * (g @ lora_a.to(grad_y.dtype))).reshape(x.shape)
        if ctx.needs_input_grad[2]:
            grad_a = (s * g.t() @ x.reshape(-1, x.shape[-1])).to(lora_a.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (s * grad_y2.t() @ u.reshape(-1, u.shape[-1])).to(lora_b.dtype)
        return grad_x, None, grad_a, grad_b, None, None


def packed_lora_linear(x: torch.Tensor, weight_fn: Callable[[], torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Functional form of :class:`PackedLoraMatmul`."""
    return PackedLoraMatmul.apply(x, weight_fn, lora_a, lora_b, scaling, bias)
