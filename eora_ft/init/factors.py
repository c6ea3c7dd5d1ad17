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
            the remaining rows of ``a`` / columns of ``b`` are zero); ``rank`` for QLoRA's ``B = 0``.
    """

    a: torch.Tensor
    b: torch.Tensor
    effective_rank: int
    base: object | None = None  # an init that re-compresses the base (LoftQ) puts its own Q_T here

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def to(self, device: torch.device | str) -> "LowRankFactors":
        """The same factors with ``a`` and ``b`` on ``device``."""
        return LowRankFactors(self.a.to(device), self.b.to(device), self.effective_rank, self.base)

    def delta(self) -> torch.Tensor:
        """``B @ A`` ``[N, K]``."""
        return self.b @ self.a

    def scaled_for_peft(self, scaling: float) -> "LowRankFactors":
        """Factors that give the same correction through PEFT's ``scaling * B @ A``.

        With ``B = 0`` (QLoRA) the correction is zero whatever the split: ``A`` stays as PEFT would draw it."""
        if not torch.any(self.b):
            return self
        root = scaling**0.5
        return LowRankFactors(self.a / root, self.b / root, self.effective_rank, self.base)

    def truncate(self, rank: int) -> "LowRankFactors":
        """The leading ``rank`` directions (exact for SVD-ordered factors: eora, act_diag, svd)."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"cannot truncate rank-{self.rank} factors to rank={rank}")
        return LowRankFactors(self.a[:rank], self.b[:, :rank], min(rank, self.effective_rank), self.base)

    def quantized(self, bits: int, group_size: int = 128) -> "LowRankFactors":
        """``A`` and ``B`` rounded to a ``bits``-bit min-max grid (per row, in groups along the inner dim),
        as the EoRA paper stores its adapters (4-bit recommended)."""
        return LowRankFactors(fake_quantize_rows(self.a, bits, group_size), fake_quantize_rows(self.b, bits, group_size),
                              self.effective_rank, self.base)


def fake_quantize_rows(matrix: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """``matrix`` ``[R, C]`` with every row group of ``min(group_size, C)`` columns snapped to an asymmetric
    ``bits``-bit grid (our RTN quantizer); returned in fp32, same shape."""
    from eora_ft.compress.quantizer import QuantSpec, fake_quantize, grid_params

    spec = QuantSpec(bits=bits, group_size=-1)
    rows, cols = matrix.shape
    group = min(group_size, cols) if cols % min(group_size, cols) == 0 else cols
    grouped = matrix.to(torch.float32).reshape(rows * (cols // group), group)
    scale, zero = grid_params(grouped, spec)
    return fake_quantize(grouped, scale, zero, spec.maxq).reshape(rows, cols)


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
