"""QLoRA / PEFT default: Kaiming-uniform ``A``, ``B = 0`` (the adapter starts as the identity correction)."""

from __future__ import annotations

import math

import torch

from .factors import LowRankFactors


def qlora_factors(delta_w: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> LowRankFactors:
    """PEFT's ``init_lora_weights=True``: ``A ~ kaiming_uniform(a=sqrt(5))`` ``[rank, K]``, ``B = 0`` ``[N, rank]``,
    both fp32 on ``delta_w``'s device.

    ``A`` is drawn on the generator's device (a CPU generator by default) and then moved, so a seed gives
    the same adapter whether the layer is compressed on a CPU or a GPU."""
    n, k = delta_w.shape
    bound = math.sqrt(6.0 / ((1 + 5.0) * k))  # kaiming_uniform_ with a = sqrt(5), fan_in = K
    draw_device = generator.device if generator is not None else delta_w.device
    a = (torch.rand(rank, k, generator=generator, device=draw_device) * 2 - 1) * bound
    b = torch.zeros(n, rank, dtype=torch.float32, device=delta_w.device)
    return LowRankFactors(a.to(device=delta_w.device, dtype=torch.float32), b, rank)  # every direction trains
