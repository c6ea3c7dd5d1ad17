"""QLoRA / PEFT default: Kaiming-uniform ``A``, ``B = 0`` (the adapter starts as the identity correction)."""

from __future__ import annotations

import math

import torch

from .factors import LowRankFactors


def qlora_factors(delta_w: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> LowRankFactors:
    """PEFT's ``init_lora_weights=True``: ``A ~ kaiming_uniform(a=sqrt(5))`` ``[rank, K]``, ``B = 0`` ``[N, rank]``."""
    n, k = delta_w.shape
    bound = math.sqrt(6.0 / ((1 + 5.0) * k))  # kaiming_uniform_ with a = sqrt(5), fan_in = K
    a = (torch.rand(rank, k, generator=generator) * 2 - 1) * bound
    return LowRankFactors(a.to(torch.float32), torch.zeros(n, rank), rank)  # every direction trains
