"""Compressors for a weight that must land where a compressed layer already is: a merge of ``W_c + s B A``.

A merged linear keeps the storage of the layer it replaces (bits, group size, grid symmetry, and the keep-mask
of a pruned base, so 2:4 kernels still apply), and only its values change. Two ways to get them:

- :class:`OnGrid` (``recompress``): GPTQ onto the base's own grid (and mask): the target ``W'`` starts next to
  ``W_c``, which is on that grid, so GPTQ's error feedback only has to place the correction, on the calibration
  inputs.
- :class:`KeepMask` or :class:`~eora_ft.compress.gptq.GPTQ` (``regrid``): GPTQ with fresh grids chosen from
  ``W'`` (a pruned base keeps its mask; the optimal-brain-surgeon sweep re-solves only the kept weights). A new
  grid brings a new rounding error about as large as the base's own, which the adapter had compensated.
- :class:`SameGrid` (``round``, the naive merge, no data): every weight rounded onto the layer's own grid.
  Rounding to the grid the correction was trained against re-quantizes most of the correction away (a step of
  the grid is larger than most entries of ``s B A``): the baseline the data-driven merge must beat.

:func:`recompressor_for` picks one for an existing :class:`CompressedLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eora_ft.kernels.packing import unpack_mask

from .gptq import GPTQ
from .linear import CompressedLinear
from .obs import obs_sweep
from .quantizer import QuantSpec
from .result import QuantizedWeight, SparseWeight
from .rtn import RTN
from .stats import ActivationStats

RECOMPRESS_METHODS = ("recompress", "regrid", "round")
# the recorded method of a dense quantized base -> how its merge re-solves it (a data-free base stays data-free)
_DENSE = {"rtn": RTN, "gptq": GPTQ}


def keep_mask(layer: CompressedLinear, target: torch.Tensor, pruned: str | None) -> torch.Tensor | None:
    """The keep-mask bool ``[N, K]`` of a pruned ``layer`` (None for a dense one), on ``target``'s device.

    A pruned-only layer stores it. A pruned and quantized one does not (pruned codes sit at the zero point), so
    it is read from its zeros, and where a kept weight also rounded to zero, a group of an ``n:m`` pattern
    (``pruned``, e.g. ``"2:4"``) is completed with its largest entries of ``target`` ``[N, K]``, the new weight:
    every weight that was kept stays kept, and the pattern stays ``n:m``."""
    if layer.bits is None:
        return unpack_mask(layer.keep_bits, layer.in_features).to(target.device)
    if pruned is None:
        return None
    kept = layer.dequantize(torch.float32).to(target.device) != 0
    if ":" not in pruned:
        return kept
    n, m = (int(part) for part in pruned.split(":"))
    rows, k = kept.shape
    grouped_kept = kept.reshape(rows, k // m, m)
    # rank candidates: kept weights first, then the zeros by the new weight's magnitude
    score = target.abs().reshape(rows, k // m, m) + grouped_kept * (target.abs().max() + 1)
    mask = torch.zeros_like(grouped_kept)
    mask.scatter_(2, score.topk(n, dim=2).indices, True)
    if bool((grouped_kept & ~mask).any()):
        raise ValueError(f"the layer keeps more than {n} of {m} weights in a group: it is not {pruned}-sparse")
    return mask.reshape(rows, k)


def grid_symmetric(layer: CompressedLinear) -> bool:
    """Whether a quantized layer's grid is symmetric (every zero point in the middle, GPTQ's ``sym``)."""
    return bool((layer.zeros == 2 ** (layer.bits - 1)).all())


class KeepMask:
    """OBS sweep over a fixed keep-mask (SparseGPT's reconstruction without choosing a new mask), quantizing the
    kept weights on a fresh grid when ``spec`` is set."""

    needs_stats = True

    def __init__(self, mask: torch.Tensor, spec: QuantSpec | None, damp_percent: float = 0.01, block_size: int = 128):
        self.mask, self.spec, self.damp_percent, self.block_size = mask, spec, damp_percent, block_size

    def compress(self, weight: torch.Tensor, stats: ActivationStats) -> QuantizedWeight | SparseWeight:
        """``weight`` ``[N, K]`` -> the kept weights re-solved (and quantized) on the statistics' Hessian."""
        result = obs_sweep(weight, stats.covariance(), quant=self.spec, fixed_mask=self.mask, overwrite_hessian=True,
                           damp_percent=self.damp_percent, block_size=self.block_size)
        if self.spec is None:
            return SparseWeight(result.values.to(torch.float32), result.mask)
        return QuantizedWeight(result.codes.t().contiguous(), result.scales.to(torch.float32),
                               result.zeros.to(torch.float32), self.spec, mask=result.mask)


class OnGrid:
    """GPTQ onto a fixed grid (a quantized base's own scales and zero points, contiguous groups), over its keep-mask
    when it is pruned: the merge's target starts on that grid, so only where the correction moves it does a code
    change, each change's error fed back onto the weights not yet visited."""

    needs_stats = True

    def __init__(self, layer: CompressedLinear, mask: torch.Tensor | None, spec: QuantSpec, damp_percent: float,
                 act_order: bool) -> None:
        self.grid = (layer.scales.to(torch.float32), layer.zeros.to(torch.float32))
        self.mask, self.spec, self.damp_percent = mask, spec, damp_percent
        self.act_order = act_order and mask is None

    def compress(self, weight: torch.Tensor, stats: ActivationStats) -> QuantizedWeight:
        result = obs_sweep(weight, stats.covariance(), quant=self.spec, fixed_mask=self.mask, fixed_grid=self.grid,
                           overwrite_hessian=True, damp_percent=self.damp_percent, act_order=self.act_order)
        return QuantizedWeight(result.codes.t().contiguous(), result.scales, result.zeros, self.spec, mask=result.mask)


@dataclass
class GridCodes:
    """Codes ``[K, N]`` on an existing layer's grid (``scales``/``zeros`` ``[G, N]``, ``g_idx`` ``[K]``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor

    def to_module(self, bias: torch.Tensor | None, dtype: torch.dtype) -> CompressedLinear:
        return CompressedLinear.from_codes(self.codes, self.scales, self.zeros, self.bits, self.group_size,
                                           g_idx=self.g_idx, bias=bias, dtype=dtype)


class SameGrid:
    """The naive merge: round a new weight onto ``layer``'s own grid (its scales, zero points and group of each
    input; pruned weights stay at the zero point). No statistics."""

    needs_stats = False

    def __init__(self, layer: CompressedLinear, mask: torch.Tensor | None) -> None:
        self.mask = mask
        if layer.bits is not None:
            self.bits, self.group_size = layer.bits, layer.group_size
            _, self.g_idx = layer.codes_in_original_order()
            self.scales, self.zeros = layer.scales.to(torch.float32), layer.zeros.to(torch.float32)

    def compress(self, weight: torch.Tensor, stats: ActivationStats | None = None) -> GridCodes | SparseWeight:
        if self.mask is not None and not hasattr(self, "bits"):
            return SparseWeight(weight * self.mask, self.mask)
        scale, zero = self.scales[self.g_idx].t(), self.zeros[self.g_idx].t()  # [N, K]
        codes = torch.clamp(torch.round(weight.to(torch.float32) / scale) + zero, 0, 2 ** self.bits - 1)
        if self.mask is not None:
            codes = torch.where(self.mask, codes, zero)
        return GridCodes(codes.t().to(torch.uint8), self.scales, self.zeros, self.bits, self.group_size, self.g_idx)


def recompressor_for(layer: CompressedLinear, target: torch.Tensor, how: str, recorded: dict):
    """The compressor that turns ``target`` ``[N, K]`` (fp32) into a layer stored like ``layer``.

    ``how``: ``recompress`` or ``round`` (:data:`RECOMPRESS_METHODS`). ``recorded``: what the base recorded about
    its compression (``method`` and the options of ``eora-ft compress`` or a recipe; empty for another tool's
    checkpoint): the damping and act-order of a GPTQ base, and the sparsity pattern of a pruned and quantized one
    (detected as 2:4 when the base records nothing and every group of 4 holds at most 2 non-zeros)."""
    if how not in RECOMPRESS_METHODS:
        raise ValueError(f"merge method {how!r} is not valid; choose one of {RECOMPRESS_METHODS}")
    method = recorded.get("method")
    options = recorded.get("options", recorded)
    pruned = None
    if layer.bits is not None:
        if method in ("sparsegpt", "wanda", "gptq+sparsegpt"):
            pruned = str(options.get("sparsity", "2:4"))
        elif method is None and _at_most_two_of_four(layer):
            pruned = "2:4"
    mask = keep_mask(layer, target, pruned)
    if how == "round":
        return SameGrid(layer, mask)
    damp = float(options.get("damp_percent", 0.01))
    if layer.bits is None:
        return KeepMask(mask, None, damp)
    spec = QuantSpec(bits=layer.bits, group_size=layer.group_size, sym=grid_symmetric(layer),
                     grid_search=bool(options.get("grid_search", False)))
    act_order = bool(options.get("act_order", True))
    if how == "recompress" and layer.perm is None:
        return OnGrid(layer, mask, spec, damp, act_order)
    if mask is not None:
        return KeepMask(mask, spec, damp)
    dense = _DENSE.get(method, GPTQ)
    return dense(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, grid_search=spec.grid_search,
                 damp_percent=damp, act_order=act_order)


def _at_most_two_of_four(layer: CompressedLinear) -> bool:
    if layer.in_features % 4:
        return False
    zeros = layer.dequantize(torch.float32) == 0
    return bool((zeros.reshape(layer.out_features, -1, 4).sum(-1) >= 2).all())
