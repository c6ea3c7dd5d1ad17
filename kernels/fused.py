"""Small-M fused kernels: dequantize inside the K loop, the LoRA term as one extra K slab.

Forward  ``y[M, N] = x W_c^T + (s x A^T) B^T (+ bias)``: the dense ``W_c`` is never written out; the
LoRA term is the slab ``[s U | B^T]`` with ``U = x A^T`` (``[M, r]``, computed first, tiny), reduced in
chunks of the K tile's width, so any rank (the budget allocation's go up to 4 x lora_r, e.g. 512)
compiles to the same registers as the K loop.
Twin     ``dX[M, K] = dY W_c + (s dY B) A``: the same tiles transposed, looping over N.
For generation and evaluation (M up to a few dozen tokens); training uses dequantize + matmul.

Numerics: the dots take their operands in the activations' dtype (bf16 / fp16: the weight tile is
dequantized in fp32 and rounded once to that dtype, as the reference ``dequantize(dtype=...)`` does)
and accumulate in fp32 on the tensor cores; fp32 activations use ``input_precision="ieee"`` (true
fp32, not TF32). The reduction may be split among programs (``SPLIT``, see :mod:`.configs`), which add
their partial sums atomically into an fp32 buffer; the result is then cast to the activations' dtype
(with a split, the order of those additions varies from run to run: results repeat to fp32 round-off,
not bit for bit).

Import only where Triton runs (GPU, or ``TRITON_INTERPRET=1`` set before import on CPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .configs import SPLITS, fused_configs
from .dequant import _weight_tile, one_group
from .launch import launch


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fused_forward_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
                          M, N, K, R, group_size, SPLIT, HAS_BIAS: tl.constexpr, BITS: tl.constexpr, IEEE: tl.constexpr,
                          ONE_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K  # this program's share of K, whole blocks
    k_first = split * k_span
    for k0 in range(k_first, tl.minimum(k_first + k_span, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0)
        w = _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, N, K, group_size, BITS, BLOCK_K, ONE_GROUP)
        acc += _dot(x, w.to(dtype), IEEE)
    if split == 0:  # the LoRA slab (s U) [M, r] x B^T [r, N], and the bias, once
        # r in chunks of BLOCK_K: the weight tile's shape, so any rank costs the registers of the K loop
        for r0 in range(0, R, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            u = tl.load(u_ptr + offs_m[:, None] * R + offs_r[None, :],
                        mask=(offs_m < M)[:, None] & (offs_r < R)[None, :], other=0)
            b_t = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None],
                          mask=(offs_r < R)[:, None] & (offs_n < N)[None, :], other=0)
            acc += _dot(u.to(dtype), b_t.to(dtype), IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                  mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], sem="relaxed")


@triton.jit
def _fused_grad_input_kernel(dy_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_ptr, a_ptr, dx_ptr,
                             M, N, K, R, group_size, SPLIT, BITS: tl.constexpr, IEEE: tl.constexpr,
                             ONE_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_span = tl.cdiv(tl.cdiv(N, BLOCK_N), SPLIT) * BLOCK_N
    n_first = split * n_span
    for n0 in range(n_first, tl.minimum(n_first + n_span, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                     mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], other=0)
        w_t = _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, tl.program_id(1) * BLOCK_K, offs_n, N, K, group_size,
                           BITS, BLOCK_K, ONE_GROUP)  # [BK, BN]
        acc += _dot(dy, tl.trans(w_t.to(dtype)), IEEE)
    if split == 0:  # slab: (s dY B) [M, r] x A [r, K], once
        for r0 in range(0, R, BLOCK_N):  # r in chunks of BLOCK_N, the reduced width of the N loop
            offs_r = r0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + offs_m[:, None] * R + offs_r[None, :],
                        mask=(offs_m < M)[:, None] & (offs_r < R)[None, :], other=0)
            a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                        mask=(offs_r < R)[:, None] & (offs_k < K)[None, :], other=0)
            acc += _dot(g.to(dtype), a.to(dtype), IEEE)
    tl.atomic_add(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc,
                  mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], sem="relaxed")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _autotuned(kernel, dtype: torch.dtype):
    """``kernel`` autotuned over :func:`.configs.fused_configs` x :data:`.configs.SPLITS`, keyed on the shape;
    only configurations whose K tile lies inside one quantization group are tried (there is always one:
    group sizes are multiples of 32, and so is K). The fp32 output is zeroed before every trial."""
    configs = [triton.Config({**blocks.meta(), "SPLIT": split}, num_warps=blocks.num_warps,
                             num_stages=blocks.num_stages) for blocks in fused_configs(dtype) for split in SPLITS]
    output = "y_ptr" if "y_ptr" in kernel.arg_names else "dx_ptr"

    def inside_groups(configs, named_args, **_):
        kept = [c for c in configs if one_group(named_args["group_size"], c.kwargs["BLOCK_K"])]
        return kept or configs

    with_groups = triton.heuristics({"ONE_GROUP": lambda args: one_group(args["group_size"], args["BLOCK_K"])})(kernel)
    return triton.autotune(configs=configs, key=["M", "N", "K", "R", "group_size"], reset_to_zero=[output],
                           prune_configs_by={"early_config_prune": inside_groups})(with_groups)


_TUNED: dict = {}


def _launch(kernel, grid_for, args: tuple, constants: dict, split: int | None, dtype: torch.dtype) -> None:
    """Run ``kernel``: autotuned on a GPU (unless ``split`` pins the split, with the first block
    configuration), the first configuration under the interpreter. ``args[-1]`` is the group size."""
    if split is None and not _interpreted():
        if (kernel, dtype) not in _TUNED:
            _TUNED[kernel, dtype] = _autotuned(kernel, dtype)
        grid = lambda meta: grid_for(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["SPLIT"])  # noqa: E731
        launch(_TUNED[kernel, dtype], grid, args[0], *args, **constants)
        return
    blocks = fused_configs(dtype)[0]
    split = split or 1
    launch(kernel, grid_for(blocks.block_m, blocks.block_n, blocks.block_k, split), args[0],
           *args, SPLIT=split, ONE_GROUP=one_group(args[-1], blocks.block_k), **constants, **blocks.meta(),
           num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def fused_forward(x: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, u: torch.Tensor | None = None,
                  split: int | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` -> ``y`` ``[M, N]`` (dtype of ``x``) without materialising ``W_c``; pass ``u = x A^T``
    ``[M, r]`` if the caller already has it (the autograd function keeps it for backward). ``split``
    pins the split of K (tests); None lets the autotuner choose on a GPU (1 under the interpreter)."""
    m, k = x.shape
    n, rank = qweight.shape[1], lora_a.shape[0]
    x = x.contiguous()
    if u is None:
        u = x.float() @ lora_a.float().t()
    u = (scaling * u.float()).to(x.dtype).contiguous()  # [M, r]: the LoRA slab's left operand
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)  # the programs add their partial sums
    group = k if group_size == -1 else group_size

    def grid(block_m, block_n, _block_k, splits):
        return triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits

    _launch(_fused_forward_kernel, grid,
            (x, qweight, scales, zeros, u, lora_b.contiguous(), bias if bias is not None else x, y, m, n, k, rank, group),
            {"HAS_BIAS": bias is not None, "BITS": bits, "IEEE": x.dtype == torch.float32},
            split, x.dtype)
    return y.to(x.dtype)


def fused_grad_input(grad_y: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int, in_features: int,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, split: int | None = None) -> torch.Tensor:
    """``dY`` ``[M, N]`` -> ``dX`` ``[M, K]`` = ``dY W_c + s (dY B) A`` without materialising ``W_c``;
    ``split`` pins the split of N (see :func:`fused_forward`)."""
    m, n = grad_y.shape
    rank = lora_a.shape[0]
    grad_y = grad_y.contiguous()
    g = (scaling * (grad_y.float() @ lora_b.float())).to(grad_y.dtype).contiguous()  # [M, r]
    dx = torch.zeros(m, in_features, dtype=torch.float32, device=grad_y.device)
    group = in_features if group_size == -1 else group_size

    def grid(block_m, _block_n, block_k, splits):
        return triton.cdiv(m, block_m), triton.cdiv(in_features, block_k), splits

    _launch(_fused_grad_input_kernel, grid,
            (grad_y, qweight, scales, zeros, g, lora_a.contiguous(), dx, m, n, in_features, rank, group),
            {"BITS": bits, "IEEE": grad_y.dtype == torch.float32}, split, grad_y.dtype)
    return dx.to(grad_y.dtype)
