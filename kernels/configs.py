"""Every block configuration the Triton kernels may run with, and when each path runs.

On a GPU the fused kernels autotune over their list for the activations' dtype (keyed on the
problem shape, so each projection of a model gets its own choice, split included); under the interpreter
(``TRITON_INTERPRET=1``, CPU tests) they run the first entry, as the interpreter's cost grows with
the number of programs. ``tests/kernels/test_aot_compile.py`` and ``benchmarks/kernel_report.py``
compile every entry for sm_80 and sm_90, every bit width and activation dtype.

The split (``SPLIT_K`` of the forward, ``SPLIT_N`` of the ``dX`` twin) divides the reduction among
programs that add their partial sums atomically into an fp32 buffer: at M <= 16 tokens a 4096 x 1024
projection has only 16 output tiles of 64 columns, which would leave most of a 132-SM GPU idle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch shape of one kernel configuration."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


# Small-M fused kernels: the token tile is 16 rows (tl.dot's minimum); the weight tile is what varies.
# bf16/fp16 dots on the tensor cores; a K tile of 32 keeps group-32 quantization inside one group.
FUSED_HALF = (
    Blocks(16, 64, 64, num_warps=4, num_stages=3),
    Blocks(16, 128, 64, num_warps=4, num_stages=3),
    Blocks(16, 64, 128, num_warps=4, num_stages=4),
    Blocks(16, 64, 32, num_warps=4, num_stages=4),
)
# fp32 IEEE dots run on the FMA units and keep their operands in registers: larger tiles spill (measured
# with kernels/aot.py: 16x64x64 with 4 warps uses all 255 registers and spills 200-650 bytes).
FUSED_FP32 = (
    Blocks(16, 32, 32, num_warps=4, num_stages=2),
    Blocks(16, 64, 32, num_warps=8, num_stages=2),
)
SPLITS = (1, 2, 4, 8)
# Dequantization into the large-M path's scratch buffer (a copy, memory-bound), autotuned on a GPU per
# shape, bit width and dtype among the tiles that lie inside one quantization group. The interpreter runs
# the first entry, or the second when the group size is 32 (a 64-input tile would span two groups).
# Wider K tiles write longer contiguous runs of the [N, K] output; wider N tiles read longer runs of codes.
# At most 32 weights per thread: 64 (128 x 64 with 4 warps) spills on sm_80 for fp32 (kernels/aot.py).
DEQUANT = (
    Blocks(0, 64, 64, num_warps=4, num_stages=1),
    Blocks(0, 64, 32, num_warps=4, num_stages=1),
    Blocks(0, 128, 32, num_warps=4, num_stages=1),
    Blocks(0, 32, 128, num_warps=4, num_stages=1),
    Blocks(0, 128, 64, num_warps=8, num_stages=1),
    Blocks(0, 64, 128, num_warps=8, num_stages=1),
    Blocks(0, 256, 32, num_warps=8, num_stages=1),
)


def fused_configs(dtype: torch.dtype) -> tuple[Blocks, ...]:
    """The block configurations of the fused kernels for activations of ``dtype`` (the first one is what
    the interpreter runs)."""
    return FUSED_FP32 if dtype == torch.float32 else FUSED_HALF

# Tokens up to which the fused small-M kernels run instead of dequantize + cuBLAS, per compute
# capability. Not measured yet (no GPU has run benchmarks/gpu_check.py): 16 is the fused kernels'
# token tile, where dequantizing inside the K loop replaces a full-weight write + read; gpu_check.py
# prints the measured crossover to put here.
SMALL_M_MAX_TOKENS = {(8, 0): 16, (8, 6): 16, (8, 9): 16, (9, 0): 16}
SMALL_M_DEFAULT = 16


def small_m_max_tokens(device: torch.device) -> int:
    """The small-M / large-M switch for ``device``'s architecture (the default for one not in the table)."""
    if device.type != "cuda":
        return SMALL_M_DEFAULT
    return SMALL_M_MAX_TOKENS.get(torch.cuda.get_device_capability(device), SMALL_M_DEFAULT)
