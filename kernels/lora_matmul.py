"""``y = x W_c^T + s (x A^T) B^T`` and its backward over a frozen packed ``W_c``, as one autograd function.

Large-M (training) path: dequantize ``W_c`` (Triton into the device's shared scratch buffer on a GPU,
:mod:`.scratch`; the pure-torch reference on CPU), one dense matmul, and the LoRA term with
``U = x A^T`` saved in forward. On a GPU the backward dequantizes ``W_c`` again (a bandwidth-bound pass, small
next to the matmul, and GPU memory is what bounds the batch); on a CPU, where dequantizing costs a good part
of the matmul, the forward's ``W_c`` is kept for the backward while the host has memory to spare
(:func:`keep_weight_for_backward`). The backward reads ``dY`` once for ``G = dY B`` and ``dB = s dY^T U``;
``dX = dY W_c + s G A``, ``dA = s G^T x``; ``W_c`` gets no gradient.

Small-M (generation, evaluation) path, on a GPU or when forced: the fused Triton kernels of
:mod:`.fused` (dequantize inside the K loop, LoRA as an extra K slab) for ``y`` and for ``dX``. The
switch point is a table per GPU architecture (:func:`.configs.small_m_max_tokens`). Where Triton cannot
run (:mod:`.launch`: no C compiler, no driver), the fused path falls back to the large-M one, with one
warning per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import psutil
import torch

from . import launch
from .configs import small_m_max_tokens



@dataclass(frozen=True)
class Packed:
    """The packed operands the fused kernels read: int32 ``qweight`` ``[K*bits/32, N]``, ``scales`` and
    ``zeros`` ``[G, N]``, for a layer without input permutation."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int


# Keep a CPU layer's W_c between forward and backward only while this much host memory stays free after it:
# each kept layer lowers what the next one sees, so a model too large to keep them all keeps its first layers.
KEEP_FREE_BYTES = 2 << 30


def keep_weight_for_backward(weight: torch.Tensor) -> bool:
    """Whether to save the dequantized ``weight`` for the backward instead of dequantizing it again: on a CPU,
    while at least :data:`KEEP_FREE_BYTES` of host memory stays available after it."""
    if weight.device.type != "cpu":
        return False
    return psutil.virtual_memory().available - weight.numel() * weight.element_size() > KEEP_FREE_BYTES


def _use_fused(packed: Packed | None, tokens: int, force: bool) -> bool:
    if packed is None or launch.unavailable() is not None:
        return False
    return force or (packed.qweight.is_cuda and tokens <= small_m_max_tokens(packed.qweight.device))


FUSED_FALLBACK_COST = ("small-M (generation, evaluation) layers dequantize the whole weight and run a dense matmul "
                       "instead of one fused kernel: slower, and one dense N x K weight per layer in flight")


def _fused(name: str):
    """``fused_forward`` or ``fused_grad_input``; :class:`.launch.TritonUnavailable` where Triton is missing."""
    try:
        from . import fused
    except ImportError as err:
        raise launch.record_failure(err) from err
    return getattr(fused, name)


class PackedLoraMatmul(torch.autograd.Function):
    """Inputs: ``x`` ``[..., K]``, ``weight_fn(dtype)`` returning ``W_c`` ``[N, K]`` in that dtype (recomputed
    in backward instead of saved; it must not capture ``x`` or any activation, which would outlive
    activation checkpointing), ``A`` ``[r, K]``, ``B`` ``[N, r]``, ``scaling``, optional ``bias`` ``[N]``,
    optional :class:`Packed` operands for the small-M fused kernels (``force_fused`` for tests).
    Call it through :func:`packed_lora_linear`, which handles autocast."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fn: Callable[[], torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, bias: torch.Tensor | None, packed: Packed | None = None,
                force_fused: bool = False) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        ctx.empty = tokens == 0
        if ctx.empty:  # a mixture-of-experts expert no token was routed to, called so its adapters get zero
            # gradients on every rank (FSDP2 and ZeRO-3 reduce the same tensors everywhere): nothing to compute
            ctx.save_for_backward(x, lora_a, lora_b)
            return x.new_zeros(*x.shape[:-1], lora_b.shape[0])
        # without autocast the LoRA term runs in the adapter's dtype (fp32 adapters on a bf16 base), as PEFT's
        # own layer does; under autocast packed_lora_linear has already cast everything to the autocast dtype
        u = x.to(lora_a.dtype) @ lora_a.t()  # [..., r]
        ctx.fused = _use_fused(packed, tokens, force_fused)
        kept = None
        if ctx.fused:
            p = packed
            try:
                y = _fused("fused_forward")(x.reshape(tokens, -1), p.qweight, p.scales, p.zeros, p.bits, p.group_size,
                                            lora_a, lora_b, scaling, bias, u=u.reshape(tokens, -1))
                y = y.reshape(*x.shape[:-1], -1)
            except launch.TritonUnavailable:  # no C compiler or driver for Triton: the dequantize + matmul path
                launch.warn_fallback("the fused small-M LoRA kernels (and dequantization)", FUSED_FALLBACK_COST)
                ctx.fused = False
        if not ctx.fused:
            weight = weight_fn(x.dtype)
            y = x @ weight.t()
            if bias is not None:
                y = y + bias.to(y.dtype)
            y = y + (scaling * (u @ lora_b.t())).to(y.dtype)
            kept = weight if ctx.needs_input_grad[0] and keep_weight_for_backward(weight) else None
        # saved, not set on ctx: activation checkpointing's hooks must see (and drop) the kept weight too
        ctx.save_for_backward(x, u, lora_a, lora_b, kept)
        ctx.weight_fn, ctx.scaling, ctx.packed = weight_fn, scaling, packed
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if ctx.empty:
            x, lora_a, lora_b = ctx.saved_tensors
            grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
            return grad_x, None, torch.zeros_like(lora_a), torch.zeros_like(lora_b), None, None, None, None
        x, u, lora_a, lora_b, kept = ctx.saved_tensors
        s = ctx.scaling
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        g = grad_y2.to(lora_b.dtype) @ lora_b  # [M, r] in the adapter dtype: the one extra read of dY
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0] and ctx.fused:
            p = ctx.packed
            try:
                grad_x = _fused("fused_grad_input")(grad_y2, p.qweight, p.scales, p.zeros, p.bits, p.group_size,
                                                    p.in_features, lora_a, lora_b, s).reshape(x.shape).to(x.dtype)
            except launch.TritonUnavailable:
                launch.warn_fallback("the fused small-M LoRA kernels (and dequantization)", FUSED_FALLBACK_COST)
        if ctx.needs_input_grad[0] and grad_x is None:
            weight = ctx.weight_fn(grad_y.dtype) if kept is None else kept.to(grad_y.dtype)
            grad_x = (grad_y2 @ weight + (s * (g @ lora_a)).to(grad_y.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_a = s * g.t() @ x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = s * grad_y2.to(lora_b.dtype).t() @ u.reshape(-1, u.shape[-1]).to(lora_b.dtype)
        return grad_x, None, grad_a, grad_b, None, None, None, None


def packed_lora_linear(x: torch.Tensor, weight_fn: Callable[[torch.dtype], torch.Tensor], lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float, bias: torch.Tensor | None = None,
                       packed: Packed | None = None, force_fused: bool = False) -> torch.Tensor:
    """Functional form of :class:`PackedLoraMatmul`.

    Under autocast (bf16 mixed precision on a GPU, or on a CPU) it behaves like autocast's own linear:
    ``x``, ``A``, ``B`` and the bias are cast to the autocast dtype here, outside the function, so
    forward and backward both compute in that dtype (no fp32 copies of ``x`` or ``dY`` are made or
    saved) and the adapters' gradients flow back to their fp32 parameters through the casts."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return PackedLoraMatmul.apply(x.to(dtype), weight_fn, lora_a.to(dtype), lora_b.to(dtype), scaling,
                                          None if bias is None else bias.to(dtype), packed, force_fused)
    return PackedLoraMatmul.apply(x, weight_fn, lora_a, lora_b, scaling, bias, packed, force_fused)
