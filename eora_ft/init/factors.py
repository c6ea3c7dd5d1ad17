"""The value every initializer returns: LoRA factors for one linear."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankFactors:
    """``B @ A`` approximates the compression error ``dW = W - W_c`` ``[N, K]``.

    Attributes:
        a: ``[rank, K]`` (PEFT ``lora_A.weight``); b: ``[N, rank]`` (``lora_B.weight``); fp32.
        effective_rank: number of non-vanishing directions (< rank when singular values are zero;
            the remaining rows of ``a`` / columns of ``b`` are zero).
    """

    a: torch.Tensor
    b: torch.Tensor
    effective_rank: int

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """``B @ A`` ``[N, K]``."""
        return self.b @ self.a

    def scaled_for_peft(self, scaling: float) -> "LowRankFactors":
        """Factors that give the same correction through PEFT's ``scaling * B @ A``."""
        root = scaling**0.5
        return LowRankFactors(self.a / root, self.b / root, self.effective_rank)


def split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, rtol: float = 1e-10) -> LowRankFactors:
    """Balanced rank-``rank`` factors ``B = U_r S_r^1/2``, ``A = S_r^1/2 Vh_r`` from an SVD (fp64 in, fp32 out).

    Singular values below ``rtol * s_max`` count as zero: their rows/columns are set to zero and
    excluded from ``effective_rank``.
    """
    keep = min(rank, s.shape[0])
    root = s[:keep].clamp_min(0).sqrt()
    alive = s[:keep] > rtol * s[0].clamp_min(torch.finfo(s.dtype).tiny)
    root = torch.where(alive, root, torch.zeros_like(root))
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64, device=u.device)
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float64, device=u.device)
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root.unsqueeze(1) * vh[:keep]
    return LowRankFactors(a.to(torch.float32), b.to(torch.float32), int(alive.sum()))
