"""Dequantization on a GPU: the Triton kernel when Triton can run, else the pure-torch reference.

The reference (:func:`.reference.dequantize`) is the kernel's specification and runs on CUDA tensors
too, with the same result bit for bit; it costs about four passes over the weight instead of one and a
transient uint8 copy of the codes (``N x K`` bytes). See :mod:`.launch` for what counts as Triton
being unable to run (one warning per process says why).
"""

from __future__ import annotations

import torch

from . import launch
from .reference import dequantize as reference_dequantize

REFERENCE_COST = ("slower dequantization (several pure-torch passes over every weight instead of one kernel; not "
                  "measured on a GPU yet) and an extra N x K byte buffer per layer while it runs")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` from int32 ``qweight`` ``[K*bits/32, N]``, ``scales`` and ``zeros``
    ``[G, N]`` on one device: :func:`.dequant.dequantize_triton` (into ``out`` when given), or, where Triton
    cannot run, :func:`.reference.dequantize` (a new tensor; ``out`` is then left untouched)."""
    if launch.unavailable() is None:
        try:
            from .dequant import dequantize_triton

            return dequantize_triton(qweight, scales, zeros, bits, group_size, in_features, dtype=dtype, out=out)
        except ImportError as err:  # Triton itself is missing
            launch.record_failure(err)
        except launch.TritonUnavailable:
            pass
    launch.warn_fallback("dequantization (and the fused small-M LoRA kernels)", REFERENCE_COST)
    return reference_dequantize(qweight, scales, zeros, bits, group_size, in_features, dtype=dtype)
