"""Group-wise uniform quantization grid (min-max, GPTQ's ``Quantizer`` semantics).

A weight ``w`` maps to an integer code ``q = clamp(round(w / s) + z, 0, 2**bits - 1)`` and back to
``s * (q - z)``; ``s`` and the integer zero point ``z`` are chosen per output row and group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eora_ft.kernels.packing import SUPPORTED_BITS

SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantSpec:
    """Bits, group size along K (-1 = one group per row) and symmetry of the grid."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; valid: {list(SUPPORTED_BITS)}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size} is not supported; valid: {list(SUPPORTED_GROUP_SIZES)} (-1 = per channel)"
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group(self, in_features: int) -> int:
        """Group length for a layer with ``in_features`` inputs; raises if it does not divide them."""
        group = in_features if self.group_size == -1 else self.group_size
        if in_features % group:
            raise ValueError(
                f"group_size={self.group_size} does not divide in_features={in_features}; "
                "use a divisor of in_features or -1 (per channel)"
            )
        return group


def grid_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``w`` ``[N, G]`` (float). Returns two ``[N]`` fp32 tensors."""
    w = w.to(torch.float32)
    zero = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero)
    xmax = torch.maximum(w.max(dim=1).values, zero)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row still needs a valid grid
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        zero_point = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero_point = torch.round(-xmin / scale)
    return scale, zero_point


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of ``w`` (``[N]`` or ``[N, G]``) on the grid (``scale``/``zero`` broadcast per row)."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``s * (q - z)``: the value ``w`` takes after quantization, same shape as ``w``."""
    q = quantize_codes(w, scale, zero, maxq)
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return scale * (q - zero)
