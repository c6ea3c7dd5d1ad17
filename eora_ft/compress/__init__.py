"""Compressors behind one registry, driven by the one layer-by-layer driver in :mod:`.sequential`.

A compressor is constructed from its options and exposes ``compress(weight [N, K], stats) ->
QuantizedWeight`` plus ``needs_stats``; the driver collects the statistics once per distinct input.
"""

from __future__ import annotations

from .gptq import GPTQ
from .linear import CompressedLinear
from .quantizer import QuantSpec
from .result import QuantizedWeight
from .rtn import RTN
from .stats import ActivationStats, StatsCollector

COMPRESSORS = {"gptq": GPTQ, "rtn": RTN}


def make_compressor(method: str, **options):
    """Instantiate the compressor registered as ``method`` (see :data:`COMPRESSORS`)."""
    if method not in COMPRESSORS:
        raise ValueError(f"unknown compression method {method!r}; valid: {sorted(COMPRESSORS)}")
    return COMPRESSORS[method](**options)


__all__ = [
    "COMPRESSORS", "ActivationStats", "CompressedLinear", "GPTQ", "QuantSpec", "QuantizedWeight", "RTN",
    "StatsCollector", "make_compressor",
]
