"""Stage 3, adapter initialization: initializers behind one registry and one signature, the one
layer-by-layer driver (:mod:`.sequential`: compress every linear and factor each init's correction from
the same statistics), rank budgets and the RILQ refinement (:mod:`.refine`). May import
``eora_ft.utils``, ``eora_ft.data``, ``eora_ft.compress`` and ``eora_ft.kernels``.


Every entry is ``fn(delta_w, stats, rank, *, weight, compressor, generator, **options) -> LowRankFactors``
with ``delta_w = W - W_c`` ``[N, K]``, ``stats`` the layer input's
:class:`~eora_ft.compress.stats.ActivationStats`, and the original ``weight`` and the run's
``compressor`` for initializers that re-compress (LoftQ); a comparison of initializers is a list of names.
"""

from __future__ import annotations

from typing import Callable

import torch

from eora_ft.compress import needs_statistics
from eora_ft.compress.stats import ActivationStats

from .act_diag import act_diag_factors
from .eora import eora_factors
from .eora_alt import eora_alt_factors
from .factors import LowRankFactors, fake_quantize_rows
from .loftq import loftq_factors
from .pissa import pissa_factors
from .qlora import qlora_factors
from .svd import svd_factors

Initializer = Callable[..., LowRankFactors]


def _eora(delta_w: torch.Tensor, stats: ActivationStats | None, rank: int, *, generator=None, weight=None,
          compressor=None, **options) -> LowRankFactors:
    if stats is None:
        raise ValueError("eora needs activation statistics for every target layer; none were collected")
    return eora_factors(delta_w, stats, rank, **options)


def _svd(delta_w: torch.Tensor, stats: ActivationStats | None, rank: int, *, generator=None, weight=None,
         compressor=None, **options) -> LowRankFactors:
    return svd_factors(delta_w, rank)


def _act_diag(delta_w: torch.Tensor, stats: ActivationStats | None, rank: int, *, generator=None, weight=None,
              compressor=None, **options) -> LowRankFactors:
    if stats is None:
        raise ValueError("act_diag needs activation statistics for every target layer; none were collected")
    return act_diag_factors(delta_w, stats, rank)


def _qlora(delta_w: torch.Tensor, stats: ActivationStats | None, rank: int, *, generator=None, weight=None,
           compressor=None, **options) -> LowRankFactors:
    return qlora_factors(delta_w, rank, generator=generator)


def _loftq(delta_w: torch.Tensor, stats: ActivationStats | None, rank: int, *, generator=None, weight=None,
           compressor=None, iters: int = 5, **options) -> LowRankFactors:
    if weight is None or compressor is None:
        raise ValueError("loftq re-compresses the weight: call it with weight= and compressor=")
    return loftq_factors(weight, compressor, stats, rank, iters=iters)


def _pissa(delta_w: torch.Tensor, stats: ActivationStats | None, rank: int, *, generator=None, weight=None,
           compressor=None, **options) -> LowRankFactors:
    if weight is None or compressor is None:
        raise ValueError("pissa compresses the residual of the weight's principal part: call it with weight= and "
                         "compressor=")
    return pissa_factors(weight, compressor, stats, rank)


def _eora_alt(delta_w: torch.Tensor, stats: ActivationStats | None, rank: int, *, generator=None, weight=None,
              compressor=None, iters: int = 2, **options) -> LowRankFactors:
    if stats is None or weight is None or compressor is None:
        raise ValueError("eora_alt re-compresses with the layer's statistics: call it with stats, weight= and "
                         "compressor=")
    return eora_alt_factors(weight, delta_w, compressor, stats, rank, iters=iters, **options)


INITIALIZERS: dict[str, Initializer] = {
    "eora": _eora, "eora_alt": _eora_alt, "act_diag": _act_diag, "svd": _svd, "loftq": _loftq, "qlora": _qlora,
    "pissa": _pissa,
}
# the initializers that draw from the generator: only their results depend on the seed
SEEDED_INITS = frozenset({"qlora"})
# the initializers that re-compress W and may bring their own base (.base): they need weight= and compressor=
REBASING_INITS = frozenset({"loftq", "eora_alt", "pissa"})
# the initializers that read the activation statistics themselves (the others get stats=None when nothing else
# needs them: no fp64 X^T X is accumulated for RTN/NF4 with qlora, svd or loftq)
STATISTICS_INITS = frozenset({"eora", "eora_alt", "act_diag"})


def get_initializer(name: str) -> Initializer:
    """The initializer registered as ``name``; raises with the valid names otherwise."""
    if name not in INITIALIZERS:
        raise ValueError(f"unknown init method {name!r}; valid: {sorted(INITIALIZERS)}")
    return INITIALIZERS[name]


def init_needs_statistics(name: str, compressor) -> bool:
    """Whether the initializer ``name`` reads a linear's activation statistics: itself (:data:`STATISTICS_INITS`)
    or through the run's ``compressor``, which a rebasing initializer re-runs (LoftQ over GPTQ)."""
    get_initializer(name)  # an unknown name is an error here too
    rebased_with_data = name in REBASING_INITS and compressor is not None and needs_statistics(compressor)
    return name in STATISTICS_INITS or rebased_with_data


def check_rank(rank: int, in_features: int, out_features: int, layer: str = "layer") -> None:
    """Raise unless ``1 <= rank <= min(in_features, out_features)``."""
    limit = min(in_features, out_features)
    if not 1 <= rank <= limit:
        raise ValueError(f"rank={rank} is invalid for {layer} ({out_features}x{in_features}); valid: 1..{limit}")


__all__ = ["INITIALIZERS", "REBASING_INITS", "SEEDED_INITS", "STATISTICS_INITS", "init_needs_statistics",
           "LowRankFactors", "act_diag_factors", "check_rank", "eora_alt_factors", "eora_factors", "fake_quantize_rows",
           "loftq_factors", "get_initializer", "pissa_factors", "qlora_factors", "svd_factors"]
