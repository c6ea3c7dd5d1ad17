"""Sparsity patterns: n:m (n kept in every m consecutive inputs) or an unstructured ratio."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_NM = ((2, 4), (4, 8))


@dataclass(frozen=True)
class PruneSpec:
    """``n:m`` structured sparsity (keep ``n`` of every ``m`` along K) or an unstructured ``ratio`` pruned."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @classmethod
    def parse(cls, text: str | float) -> "PruneSpec":
        """``"2:4"``, ``"4:8"`` or a fraction in (0, 1) such as ``"0.5"``."""
        text = str(text).strip()
        if ":" in text:
            try:
                n, m = (int(part) for part in text.split(":"))
            except ValueError:
                n = m = -1
            if (n, m) not in SUPPORTED_NM:
                raise ValueError(f"sparsity={text!r} is not supported; valid: {[f'{a}:{b}' for a, b in SUPPORTED_NM]} or a ratio in (0, 1)")
            return cls(n=n, m=m, ratio=1 - n / m)
        try:
            ratio = float(text)
        except ValueError:
            ratio = -1.0
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"sparsity={text!r} is not valid; use 2:4, 4:8 or a ratio in (0, 1) such as 0.5")
        return cls(ratio=ratio)

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:g}"


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask ``[N, K]`` (bool) keeping the ``n`` highest ``score`` entries in each ``m`` consecutive columns."""
    rows, k = score.shape
    if k % m:
        raise ValueError(f"in_features={k} is not a multiple of m={m} for {n}:{m} sparsity")
    grouped = score.reshape(rows, k // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, grouped.topk(n, dim=2).indices, True)
    return keep.reshape(rows, k)


def row_ratio_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask ``[N, K]`` pruning the lowest ``ratio`` fraction of ``score`` in every row."""
    pruned = int(score.shape[1] * ratio)
    mask = torch.ones_like(score, dtype=torch.bool)
    if pruned:
        mask.scatter_(1, score.topk(pruned, dim=1, largest=False).indices, False)
    return mask
