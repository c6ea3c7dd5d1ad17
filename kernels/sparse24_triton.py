"""Triton kernel of :func:`.sparse24.two_four_dense`: one pass, each program writing ``BLOCK`` groups of
four inputs from their two kept values and their mask nibble.

Import only where Triton can run (GPU, or ``TRITON_INTERPRET=1`` set before import on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

BLOCK_GROUPS = 1024


@triton.jit
def _two_four_kernel(values_ptr, keep_ptr, out_ptr, groups, BLOCK: tl.constexpr):
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = group < groups
    byte = tl.load(keep_ptr + group // 2, mask=inside, other=0).to(tl.int32)
    nibble = (byte >> ((group % 2) * 4)) & 15
    first = tl.load(values_ptr + 2 * group, mask=inside, other=0)
    second = tl.load(values_ptr + 2 * group + 1, mask=inside, other=0)
    column = tl.arange(0, 4)
    kept = ((nibble[:, None] >> column[None, :]) & 1) != 0
    lower_kept = (nibble[:, None] & ((1 << column[None, :]) - 1)) != 0  # a lower column of the group is kept
    value = tl.where(lower_kept, second[:, None], first[:, None])
    value = tl.where(kept, value, tl.zeros_like(value))
    tl.store(out_ptr + 4 * group[:, None] + column[None, :], value, mask=inside[:, None])


def two_four_dense_triton(values: torch.Tensor, keep_bits: torch.Tensor, out_features: int, in_features: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` in ``dtype`` from ``values`` ``[N*K/2]`` and an exact 2:4 uint8 ``keep_bits``
    ``[N, K/8]`` on one device; raises :class:`.launch.TritonUnavailable` where Triton cannot run."""
    groups = out_features * in_features // 4
    if values.numel() != 2 * groups or keep_bits.numel() * 2 != groups:
        raise ValueError(f"2:4 layer {out_features} x {in_features} needs {2 * groups} values and {groups // 2} "
                         f"mask bytes, got {values.numel()} and {keep_bits.numel()}")
    out = torch.empty(out_features, in_features, dtype=dtype, device=values.device)
    launch(_two_four_kernel, (triton.cdiv(groups, BLOCK_GROUPS),), values, values.to(dtype).contiguous(),
           keep_bits.contiguous(), out, groups, BLOCK=BLOCK_GROUPS)
    return out
