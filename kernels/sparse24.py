"""Dense weight of a pruned-only layer whose keep-mask is exactly 2:4, without prefix sums.

A pruned-only :class:`~eora_ft.compress.linear.CompressedLinear` stores its kept values row-major and
its keep-mask packed 8 to a byte (:func:`.packing.pack_mask`). In general the dense weight needs a
``masked_scatter_`` (on CUDA an int64 prefix sum over all ``N x K`` entries: 470 MB at 14336 x 4096; on
a CPU a single-threaded loop). With exactly two kept of every four inputs, group ``g`` (inputs
``4g .. 4g+3`` of a row) holds values ``2g`` and ``2g+1`` and its mask nibble says where they go: the
first kept column takes the first value, the second the second. :func:`two_four_dense` writes each
group from its nibble alone, in one Triton pass on a GPU (:mod:`.sparse24_triton`), or in a few
element-wise torch passes where Triton cannot run; both equal the ``masked_scatter_`` result bit for bit.
"""

from __future__ import annotations

import torch

from . import launch


def is_two_four(keep_bits: torch.Tensor, in_features: int, kept: int) -> bool:
    """Whether uint8 ``keep_bits`` ``[N, ceil(K/8)]`` keeps exactly 2 of every 4 inputs (and ``kept`` values
    match): the pattern :func:`two_four_dense` handles. ``K`` must be a multiple of 8 (whole bytes)."""
    n = keep_bits.shape[0]
    if in_features % 8 or kept * 2 != n * in_features:
        return False
    count = torch.zeros_like(keep_bits)
    for bit in range(8):
        count += (keep_bits >> bit) & 1
    low = torch.zeros_like(keep_bits)
    for bit in range(4):
        low += (keep_bits >> bit) & 1
    return bool(((low == 2) & (count == 4)).all())


def two_four_dense_torch(values: torch.Tensor, keep_bits: torch.Tensor, out_features: int, in_features: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` in ``dtype`` (``values``' device) from ``values`` ``[N*K/2]`` and an exact 2:4
    ``keep_bits`` ``[N, K/8]``, in element-wise torch passes over the ``N*K/4`` groups."""
    groups = out_features * in_features // 4
    nibble = torch.stack([keep_bits & 15, keep_bits >> 4], dim=-1).view(groups)
    pair = values.to(dtype).view(groups, 2)
    first, second = pair[:, 0], pair[:, 1]
    out = torch.empty(groups, 4, dtype=dtype, device=values.device)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    kept_0 = (nibble & 1).bool()
    # column j takes the second value when a lower column of its group is kept too, else the first
    torch.where(kept_0, first, zero, out=out[:, 0])
    torch.where((nibble & 2).bool(), torch.where(kept_0, second, first), zero, out=out[:, 1])
    torch.where((nibble & 4).bool(), torch.where((nibble & 3).bool(), second, first), zero, out=out[:, 2])
    torch.where((nibble & 8).bool(), second, zero, out=out[:, 3])  # column 3 kept: always the second
    return out.view(out_features, in_features)


TORCH_COST = "a few element-wise passes over the layer instead of one kernel for pruned-only 2:4 layers"


def two_four_dense(values: torch.Tensor, keep_bits: torch.Tensor, out_features: int, in_features: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` of an exact 2:4 pruned-only layer (check with :func:`is_two_four`): the Triton kernel
    for CUDA tensors (:func:`two_four_dense_torch` where Triton cannot run: no int64 prefix sum either);
    on a CPU :func:`masked_dense`, which the torch passes do not beat there (benchmarks/two_four_bench.py:
    0.6x-1.3x of its time at Llama-3-8B shapes, 2 cores)."""
    if not values.is_cuda:
        return masked_dense(values, keep_bits, out_features, in_features, dtype)
    if launch.unavailable() is None:
        try:
            from .sparse24_triton import two_four_dense_triton

            return two_four_dense_triton(values, keep_bits, out_features, in_features, dtype)
        except ImportError as err:
            launch.record_failure(err)
        except launch.TritonUnavailable:
            pass
    launch.warn_fallback("the 2:4 weight rebuild (and dequantization, fused LoRA kernels)", TORCH_COST)
    return two_four_dense_torch(values, keep_bits, out_features, in_features, dtype)


def masked_dense(values: torch.Tensor, keep_bits: torch.Tensor, out_features: int, in_features: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` of any pruned-only layer (``values`` ``[kept]`` row-major, ``keep_bits`` from
    :func:`.packing.pack_mask`): the general ``masked_scatter_`` path."""
    from .packing import unpack_mask

    weight = torch.zeros(out_features, in_features, dtype=dtype, device=values.device)
    return weight.masked_scatter_(unpack_mask(keep_bits, in_features), values.to(dtype))
