"""The optimal-brain-surgeon column sweep shared by GPTQ and SparseGPT (Frantar & Alistarh).

Columns are visited left to right (or in act-order); each is pruned and/or quantized, and its error,
scaled by the inverse Hessian's Cholesky factor, is pushed onto the columns not yet visited (lazy
block updates). GPTQ = quantize only; SparseGPT = prune (+ optionally quantize, the joint setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prune import PruneSpec
from .quantizer import QuantSpec, grid_params, quantize_codes


@dataclass
class SweepResult:
    """Compressed weight in original column order: values ``[N, K]`` fp64 (pruned = 0), codes int64
    ``[N, K]`` + grids ``[G, N]`` if quantized, keep-mask ``[N, K]`` bool if pruned."""

    values: torch.Tensor
    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    mask: torch.Tensor | None


def inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (fp64 ``[K, K]``)."""
    damp = damp_percent * torch.mean(torch.diag(h))
    h = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    except torch.linalg.LinAlgError as err:
        raise FloatingPointError(f"Hessian is not positive definite even with damp_percent={damp_percent}; "
                                 "raise damp_percent or use more calibration tokens") from err
    return torch.linalg.cholesky(h_inv, upper=True)


def obs_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quant: QuantSpec | None = None,
    prune: PruneSpec | None = None,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> SweepResult:
    """Run the sweep on ``weight`` ``[N, K]`` with ``hessian`` ``[K, K]`` (any float; computed in fp64).

    ``act_order`` visits columns by decreasing Hessian diagonal; the quantization groups then stay
    the original contiguous ones (static groups, chosen from the unmodified weight before the
    sweep), so the result needs no ``g_idx`` and packs like any other layer.
    """
    if quant is None and prune is None:
        raise ValueError("obs_sweep needs a quantization spec, a pruning spec, or both")
    if act_order and prune is not None:
        raise ValueError("act_order is a GPTQ option; it cannot be combined with pruning")
    n, k = weight.shape
    if prune is not None and prune.structured and k % prune.m:
        raise ValueError(f"in_features={k} is not a multiple of m={prune.m} for {prune} sparsity")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.to(torch.float64).to(w.device).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group = quant.group(k) if quant else k
    static = None
    if quant is not None and act_order:
        grids = [grid_params(w[:, g * group:(g + 1) * group], quant) for g in range(k // group)]
        static = (torch.stack([s for s, _ in grids]).to(torch.float64), torch.stack([z for _, z in grids]).to(torch.float64))
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_factor(h, damp_percent)

    codes = torch.zeros(n, k, dtype=torch.int64, device=w.device) if quant else None
    scales = torch.zeros(k // group, n, dtype=torch.float64, device=w.device) if quant else None
    zeros = torch.zeros_like(scales) if quant else None
    if static is not None:
        scales, zeros = static
    mask = torch.ones(n, k, dtype=torch.bool, device=w.device) if prune else None
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if prune is not None and not prune.structured:
            # SparseGPT's adaptive mask: the block's lowest w^2 / [H^-1]_jj^2, uniform sparsity per block
            score = w1**2 / torch.diag(hinv1).unsqueeze(0) ** 2
            threshold = torch.sort(score.flatten()).values[int(score.numel() * prune.ratio)]
            mask[:, i1:i2] = score > threshold
        for i in range(i2 - i1):
            col = i1 + i
            if prune is not None and prune.structured and i % prune.m == 0:
                score = w1[:, i:i + prune.m] ** 2 / torch.diag(hinv1)[i:i + prune.m].unsqueeze(0) ** 2
                drop = score.topk(prune.m - prune.n, dim=1, largest=False).indices
                mask[:, col:col + prune.m].scatter_(1, drop, False)
            value = w1[:, i] if mask is None else w1[:, i] * mask[:, col]
            if quant is not None:
                if static is not None:
                    g = int(perm[col]) // group
                    scale, zero = scales[g], zeros[g]
                elif col % group == 0:
                    window = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                    scale, zero = (t.to(torch.float64) for t in grid_params(window, quant))
                    scales[col // group], zeros[col // group] = scale, zero
                q = quantize_codes(value, scale, zero, quant.maxq)
                if mask is not None:  # a pruned weight sits exactly at the zero point
                    q = torch.where(mask[:, col], q, zero)
                codes[:, col] = q.to(torch.int64)
                value = scale * (q - zero)
            err = (w1[:, i] - value) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = value
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    return SweepResult(
        values=w[:, inverse],
        codes=codes[:, inverse] if codes is not None else None,
        scales=scales, zeros=zeros,
        mask=mask[:, inverse] if mask is not None else None,
    )
