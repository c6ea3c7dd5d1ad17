"""Stage 2, compression: compressors behind one registry, the packed ``CompressedLinear``, the statistics a
compressor reads, and the checkpoint formats (eora_ft, GPTQ, compressed-tensors).

A compressor is constructed from its options and exposes ``compress(weight [N, K], stats) ->
QuantizedWeight`` plus ``needs_stats`` (whether it reads the activation statistics: the driver accumulates
no ``X^T X`` for a data-free compressor unless an initializer needs it). The layer-by-layer driver that feeds it
(:func:`eora_ft.init.sequential.compress_model`) lives one stage up because the same pass also factors
every initializer's correction. May import ``eora_ft.utils``, ``eora_ft.data`` and ``eora_ft.kernels``.
"""

from __future__ import annotations

from functools import partial

from .gptq import GPTQ
from .linear import CompressedLinear
from .nf4 import NF4
from .prune import PruneSpec
from .quantizer import QuantSpec
from .result import QuantizedWeight, SparseWeight
from .rtn import RTN
from .sparsegpt import SparseGPT
from .stats import ActivationStats, StatsCollector
from .wanda import Wanda

# "gptq+sparsegpt" is the EoRA paper's joint setting: SparseGPT's sweep quantizes what it keeps.
COMPRESSORS = {
    "rtn": RTN,
    "gptq": GPTQ,
    "sparsegpt": partial(SparseGPT, bits=None),
    "wanda": Wanda,
    "gptq+sparsegpt": SparseGPT,
    "nf4": NF4,
}
# which options each method reads (others are ignored), for clear errors and the CLI
USES_BITS = {"rtn", "gptq", "gptq+sparsegpt"}
USES_SPARSITY = {"sparsegpt", "wanda", "gptq+sparsegpt"}


def needs_statistics(compressor) -> bool:
    """Whether ``compressor`` reads a linear's activation statistics (its ``needs_stats``; an object that does not
    say is assumed to)."""
    return bool(getattr(compressor, "needs_stats", True))


def make_compressor(method: str, **options):
    """Instantiate the compressor registered as ``method`` (see :data:`COMPRESSORS`)."""
    if method not in COMPRESSORS:
        raise ValueError(f"unknown compression method {method!r}; valid: {sorted(COMPRESSORS)}")
    if method not in USES_BITS:  # e.g. a config's bits is meaningless for a pure pruner
        options = {k: v for k, v in options.items() if k not in ("bits", "group_size", "sym", "grid_search")}
    elif method == "gptq+sparsegpt" and not options.get("bits"):
        options["bits"] = 4
    return COMPRESSORS[method](**options)


__all__ = [
    "COMPRESSORS", "NF4", "USES_BITS", "USES_SPARSITY", "ActivationStats", "CompressedLinear", "GPTQ", "PruneSpec",
    "QuantSpec", "QuantizedWeight", "RTN", "SparseGPT", "SparseWeight", "StatsCollector", "Wanda", "make_compressor",
    "needs_statistics",
]
