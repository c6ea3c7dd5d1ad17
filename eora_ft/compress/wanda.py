"""Wanda (Sun et al., 2024): prune by ``|W| * sqrt(E[x^2])``, per output row, no weight update."""

from __future__ import annotations

import torch

from .prune import PruneSpec, nm_mask, row_ratio_mask
from .result import SparseWeight
from .stats import ActivationStats


class Wanda:
    """Wanda pruner: n:m within each group of m inputs, or the lowest ratio of each output row."""

    needs_stats = True

    def __init__(self, sparsity: str | float = "2:4", **_: object) -> None:
        self.prune = PruneSpec.parse(sparsity)

    def compress(self, weight: torch.Tensor, stats: ActivationStats) -> SparseWeight:
        """Prune ``weight`` ``[N, K]`` with the input second moments ``diag(X^T X) / n`` ``[K]``."""
        w = weight.detach().to(torch.float32)
        metric = w.abs() * stats.second_moments().sqrt().to(device=w.device, dtype=w.dtype).unsqueeze(0)
        if self.prune.structured:
            mask = nm_mask(metric, self.prune.n, self.prune.m)
        else:
            mask = row_ratio_mask(metric, self.prune.ratio)
        return SparseWeight(w * mask, mask)
