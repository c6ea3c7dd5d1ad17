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
    """Bits, group size along K (-1 = one group per row), symmetry of the grid, and ``grid_search``: shrink the
    min-max range until the group's ``|error|^2.4`` is least (IST-DASLab/gptq's ``mse`` option: 80 steps of 1%)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    grid_search: bool = False

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
    scale, zero_point = _grid(xmin, xmax, spec)
    if spec.grid_search:
        scale, zero_point = _searched_grid(w, xmin, xmax, scale, zero_point, spec)
    return scale, zero_point


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        return scale, torch.full_like(scale, (spec.maxq + 1) / 2)
    return scale, torch.round(-xmin / scale)


# IST-DASLab/gptq quant.py: grid=100, maxshrink=0.8, norm=2.4
_SEARCH_STEPS, _SEARCH_NORM = 80, 2.4


def _searched_grid(w, xmin, xmax, scale, zero_point, spec) -> tuple[torch.Tensor, torch.Tensor]:
    best = torch.full_like(scale, float("inf"))
    for step in range(_SEARCH_STEPS):
        shrink = 1.0 - step / 100
        candidate_scale, candidate_zero = _grid(shrink * xmin, shrink * xmax, spec)
        error = (fake_quantize(w, candidate_scale, candidate_zero, spec.maxq) - w).abs_().pow_(_SEARCH_NORM).sum(1)
        better = error < best
        best = torch.where(better, error, best)
        scale = torch.where(better, candidate_scale, scale)
        zero_point = torch.where(better, candidate_zero, zero_point)
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
