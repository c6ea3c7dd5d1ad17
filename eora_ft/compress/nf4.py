"""NF4 (QLoRA's 4-bit NormalFloat) through bitsandbytes, with bitsandbytes' own storage.

No calibration data: each block of 64 weights is scaled by its absmax onto the NF4 code book. It is
the base of the QLoRA baseline; EoRA can still compensate it from the activation statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .stats import ActivationStats

NF4_BLOCK_SIZES = (64, 128, 256)
NF4_NEEDS = "compress_method=nf4 needs bitsandbytes: pip install -e \".[nf4]\" (or pip install bitsandbytes)"


def nf4_available() -> bool:
    """bitsandbytes is installed (found, not imported: importing it has side effects, see pyproject's nf4 extra)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def import_bitsandbytes():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:  # an optional dependency: the nf4 extra
        raise ImportError(NF4_NEEDS) from err
    return bnb, bnb_functional


def nf4_linear_class():
    """``NF4Linear``: bitsandbytes ``Linear4bit`` plus the ``dequantize()`` every compressed layer has."""
    bnb, functional = import_bitsandbytes()

    class NF4Linear(bnb.nn.Linear4bit):
        def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
            """Dense ``[N, K]`` weight the layer computes with."""
            weight = functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
            return weight.to(dtype or self.compute_dtype)

    return NF4Linear


@dataclass
class NF4Weight:
    """A weight quantized by bitsandbytes to NF4 (``Params4bit``: packed uint8 + quant state)."""

    params: nn.Parameter
    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor:
        _, functional = import_bitsandbytes()
        return functional.dequantize_4bit(self.params.data, self.params.quant_state).to(torch.float32)

    def to_module(self, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
        layer = nf4_linear_class()(self.in_features, self.out_features, bias=bias is not None, compute_dtype=dtype,
                                   quant_type="nf4", device="meta")
        layer.weight = self.params
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
        return layer


class NF4:
    """bitsandbytes NF4 quantizer (data-free; statistics are collected only for the initializers that read them)."""

    needs_stats = False

    def __init__(self, block_size: int = 64, double_quant: bool = True, **_: object) -> None:
        if block_size not in NF4_BLOCK_SIZES:
            raise ValueError(f"nf4 block_size={block_size} is not supported; valid: {list(NF4_BLOCK_SIZES)}")
        self.block_size, self.double_quant = block_size, double_quant

    def compress(self, weight: torch.Tensor, stats: ActivationStats | None = None) -> NF4Weight:
        bnb, _ = import_bitsandbytes()
        params = bnb.nn.Params4bit(weight.detach().to(torch.float32).contiguous(), requires_grad=False, quant_type="nf4",
                                   blocksize=self.block_size, compress_statistics=self.double_quant)
        params = params.to(weight.device if weight.device.type != "meta" else "cpu")  # quantizes on the move
        return NF4Weight(params, weight.shape[1], weight.shape[0])
