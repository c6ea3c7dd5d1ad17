"""Triton dequantization of packed codes into a dense ``[N, K]`` weight (GPTQ semantics).

``W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n])``, ``g = k // group_size``; codes packed along K
in int32 words (2/4/8-bit), 3-bit planar (a 2-bit plane then a 1-bit plane). Pruned 2:4 entries hold
the zero point, so they dequantize to exactly 0 with no mask. Writes into ``out`` when given (a
reused scratch buffer on the training path). Tiles are autotuned on a GPU (:data:`.configs.DEQUANT`).

Import only where Triton can run: on a GPU, or on CPU with ``TRITON_INTERPRET=1`` set before import.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .configs import DEQUANT
from .launch import launch
from .packing import SUPPORTED_BITS


@triton.jit
def _unpack(qweight_ptr, row0, offs_n, N, rows_total, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` of one plane: each int32 word ``[BLOCK_K / per_word, BLOCK_N]`` is loaded
    once and split into its ``32 / BITS`` codes (element ``k`` of a word at bit ``BITS * (k % per_word)``)."""
    PER_WORD: tl.constexpr = 32 // BITS
    rows = row0 + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows < rows_total)[:, None] & (offs_n < N)[None, :], other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [words, per_word, BLOCK_N]
    return tl.reshape(codes, (BLOCK_K, codes.shape[2]))


@triton.jit
def _codes(qweight_ptr, k0, offs_n, N, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` for inputs ``k0 .. k0 + BLOCK_K`` (``k0`` a multiple of BLOCK_K)."""
    if BITS == 3:  # planar: the 2-bit plane [K/16, N], then the 1-bit plane [K/32, N]
        low = _unpack(qweight_ptr, k0 // 16, offs_n, N, K // 16, 2, BLOCK_K)
        high = _unpack(qweight_ptr + (K // 16) * N, k0 // 32, offs_n, N, K // 32, 1, BLOCK_K)
        codes = low | (high << 2)
    else:  # (an else, not an early return: Triton compiles whatever follows a constexpr branch)
        codes = _unpack(qweight_ptr, k0 // (32 // BITS), offs_n, N, K // (32 // BITS), BITS, BLOCK_K)
    return codes


@triton.jit
def _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, N, K, group_size, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr, ONE_GROUP: tl.constexpr):
    """A ``[BLOCK_K, BLOCK_N]`` tile of ``W_c^T`` in fp32 (zero outside the matrix) for inputs from ``k0``.

    ``ONE_GROUP``: ``BLOCK_K`` divides the group size, so the tile's scales and zero points are one row
    ``[BLOCK_N]`` of the grids; otherwise they are gathered per input."""
    codes = _codes(qweight_ptr, k0, offs_n, N, K, BITS, BLOCK_K).to(tl.float32)
    if ONE_GROUP:
        grid_row = (k0 // group_size) * N + offs_n
        scale = tl.load(scales_ptr + grid_row, mask=offs_n < N, other=0).to(tl.float32)[None, :]
        zero = tl.load(zeros_ptr + grid_row, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
        group = offs_k // group_size
        scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
        zero = tl.load(zeros_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    return scale * (codes - zero)


def one_group(group_size: int, block_k: int) -> bool:
    """Whether every ``block_k`` tile of inputs lies inside one quantization group."""
    return group_size % block_k == 0


@triton.jit
def _dequant_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, group_size,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ONE_GROUP: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    weight = _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, N, K, group_size, BITS, BLOCK_K, ONE_GROUP)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], weight.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TUNED: list = []


def _autotuned():
    """:func:`_dequant_kernel` autotuned over :data:`.configs.DEQUANT`, keyed on the shape, group size and bit
    width (and the output dtype, which the autotuner adds), among tiles inside one quantization group."""
    configs = [triton.Config({"BLOCK_K": b.block_k, "BLOCK_N": b.block_n}, num_warps=b.num_warps,
                             num_stages=b.num_stages) for b in DEQUANT]

    def inside_groups(configs, named_args, **_):
        kept = [c for c in configs if one_group(named_args["group_size"], c.kwargs["BLOCK_K"])]
        return kept or configs

    with_groups = triton.heuristics({"ONE_GROUP": lambda args: one_group(args["group_size"], args["BLOCK_K"])})(
        _dequant_kernel)
    return triton.autotune(configs=configs, key=["N", "K", "group_size", "BITS"],
                           prune_configs_by={"early_config_prune": inside_groups})(with_groups)


def dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
                      block_k: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (or into ``out``) from int32 ``qweight`` ``[K*bits/32, N]``,
    ``scales`` ``[G, N]`` and ``zeros`` ``[G, N]`` (all on one device); same result as
    :func:`kernels.reference.dequantize`. Tiles: ``block_k`` x ``block_n`` when given (either pins both);
    otherwise autotuned on a GPU (:data:`.configs.DEQUANT`) and the first fitting entry under the interpreter.
    Raises :class:`.launch.TritonUnavailable` where Triton cannot run (see :mod:`.fallback`)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: {SUPPORTED_BITS}")
    n = qweight.shape[1]
    group = in_features if group_size == -1 else group_size
    if out is None:
        out = torch.empty(n, in_features, dtype=dtype, device=qweight.device)
    elif out.shape != (n, in_features) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {in_features}] buffer, got {tuple(out.shape)}")
    args = (qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, n, in_features, group)
    if block_k is None and block_n is None and not _interpreted():
        if not _TUNED:
            _TUNED.append(_autotuned())
        grid = lambda meta: (triton.cdiv(in_features, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        launch(_TUNED[0], grid, qweight, *args, BITS=bits)
        return out
    if block_k is None:  # a tile inside one group: one row of scales and zero points per tile
        block_k = DEQUANT[0].block_k if one_group(group, DEQUANT[0].block_k) else DEQUANT[1].block_k
    block_n = block_n or DEQUANT[0].block_n
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(n, block_n))
    launch(_dequant_kernel, grid, qweight, *args, BITS=bits, BLOCK_K=block_k, BLOCK_N=block_n,
           ONE_GROUP=one_group(group, block_k))
    return out
