"""The optimal-brain-surgeon column sweep shared by GPTQ and SparseGPT (Frantar & Alistarh).

Columns are visited left to right (or in act-order); each is pruned and/or quantized, and its error,
scaled by the inverse Hessian's Cholesky factor, is pushed onto the columns not yet visited (lazy
block updates). GPTQ = quantize only; SparseGPT = prune (+ optionally quantize, the joint setting).

Precision, as the published implementations (IST-DASLab/gptq, sparsegpt; GPTQModel): the sweep runs
in fp32. The upper Cholesky factor of the damped inverse Hessian is computed in fp64 and rounded to
fp32 once: for ``J`` the reversal permutation and ``J H J = L L^T``, it is ``J L^-1 J`` (one Cholesky and
one triangular inverse, half the work of Cholesky -> inverse -> Cholesky; the two agree to 1e-15).

Memory: every step of that chain (permutation, Cholesky, inverse) runs in the Hessian's own memory, so the
layer's statistics and that one working copy are the only ``K x K`` fp64 matrices alive (2 x 6.6 GB at
K = 28672, a 70B down_proj); the sweep rounds the factor to fp32 one block of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prune import PruneSpec
from .quantizer import QuantSpec, grid_params, quantize_codes


@dataclass
class SweepResult:
    """Compressed weight in original column order: values ``[N, K]`` fp32 (pruned = 0), codes uint8
    ``[N, K]`` + grids ``[G, N]`` if quantized, keep-mask ``[N, K]`` bool if pruned."""

    values: torch.Tensor
    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    mask: torch.Tensor | None


def _working_copy(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """fp32 copy of ``weight`` ``[N, K]`` with the columns of inputs that never fire set to 0."""
    w = weight.detach().to(torch.float32).clone()
    w[:, dead] = 0.0
    return w


TRIANGULAR_BLOCK = 512  # columns of L^-1 per step of the blocked in-place inverse: two [K, 512] fp64 temporaries
PERMUTE_BLOCK = 512  # rows / columns moved at a time by the in-place permutation: one [K, 512] fp64 temporary


def _inverse_lower(lower: torch.Tensor) -> torch.Tensor:
    """``L^-1`` of a lower-triangular fp64 ``L`` ``[K, K]`` (zeros above the diagonal) in ``L``'s own memory.

    On a CPU, LAPACK ``trtri`` (a third of the work of a triangular solve against the identity); elsewhere the
    same blocked algorithm in torch (:func:`_inverse_lower_blocked_`): no second ``K x K`` matrix either way."""
    if lower.device.type == "cpu":
        import scipy.linalg.lapack

        array = lower.numpy()
        # LAPACK works in place only on a Fortran-ordered array: L itself when torch returned it column-major
        # (its Cholesky does), else its transpose, which is upper triangular
        as_lower = array.flags.f_contiguous
        target = array if as_lower else array.T
        inverse, info = scipy.linalg.lapack.dtrtri(target, lower=int(as_lower), overwrite_c=1)
        if info:
            raise FloatingPointError(f"triangular inverse failed (LAPACK info {info})")
        if inverse.ctypes.data != target.ctypes.data:  # scipy copied after all: keep the in-place contract
            target[...] = inverse
        return lower
    return _inverse_lower_blocked_(lower)


def _inverse_lower_blocked_(lower: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``L^-1`` in place, by block columns from the last (LAPACK ``trtri``'s blocked order): with
    ``L = [[D, 0], [P, T]]`` and ``T`` already inverted in place, ``L^-1 = [[D^-1, 0], [-T^-1 P D^-1, T^-1]]``.
    Any device; temporaries ``[K, block]``. ``lower`` must hold zeros above its diagonal (torch's Cholesky
    writes them), since ``T^-1 P`` is a dense product."""
    k, block = lower.shape[0], block or TRIANGULAR_BLOCK
    for start in reversed(range(0, k, block)):
        stop = min(start + block, k)
        diagonal = lower[start:stop, start:stop]
        identity = torch.eye(stop - start, dtype=lower.dtype, device=lower.device)
        diagonal_inverse = torch.linalg.solve_triangular(diagonal, identity, upper=False)
        if stop < k:
            panel = lower[stop:, start:stop]
            panel.copy_(lower[stop:, stop:] @ panel @ diagonal_inverse).neg_()
        diagonal.copy_(diagonal_inverse)
    return lower


def _permute_symmetric_(h: torch.Tensor, order: torch.Tensor, block: int | None = None) -> None:
    """``h[order][:, order]`` written into ``h`` ``[K, K]`` itself: rows are gathered one block of columns at a
    time, then columns one block of rows at a time (each block's gather touches no other block)."""
    k, block = h.shape[0], block or PERMUTE_BLOCK
    for start in range(0, k, block):
        columns = h[:, start:start + block]
        columns.copy_(columns.index_select(0, order))
    for start in range(0, k, block):
        rows = h[start:start + block]
        rows.copy_(rows.index_select(1, order))


def _mirror_lower_(h: torch.Tensor, block: int | None = None) -> None:
    """Copy the lower triangle of ``h`` ``[K, K]`` onto its upper one, in place. Seen column-major (``h.t()``,
    what LAPACK factors in place), the lower triangle LAPACK reads is then ``h``'s own lower triangle: the
    values a row-major Cholesky of ``h`` reads, even where round-off left ``X^T X`` not exactly symmetric."""
    k, block = h.shape[0], block or PERMUTE_BLOCK
    for start in range(0, k, block):
        stop = min(start + block, k)
        square = h[start:stop, start:stop]
        below = torch.ones(stop - start, stop - start, dtype=torch.bool, device=h.device).tril_()
        square.copy_(torch.where(below, square, square.t()))
        h[start:stop, stop:] = h[stop:, start:stop].t()


def _upper_inverse_factor(h: torch.Tensor, order: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Overwrite the fp64 Hessian ``h`` ``[K, K]`` (row-major) with ``L^-1``, ``J P^T H P J = L L^T``, ``P`` the
    visiting order and ``J`` the reversal (``order`` = the visiting order reversed), and return ``L^-1`` as a
    column-major view of ``h``'s memory. ``J L^-1 J`` is the upper Cholesky factor of ``(P^T H P)^-1``
    (:func:`_inverse_rows` reads it). No second ``K x K`` matrix is ever allocated."""
    _permute_symmetric_(h, order)
    _mirror_lower_(h)
    lower = h.t()  # column-major: LAPACK / cuSOLVER factor it in place
    try:
        torch.linalg.cholesky(lower, out=lower)
    except torch.linalg.LinAlgError as err:
        raise FloatingPointError(f"Hessian is not positive definite even with damp_percent={damp_percent}; "
                                 "raise damp_percent or use more calibration tokens") from err
    return _inverse_lower(lower)


def _inverse_rows(lower_inverse: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop``, columns ``start:``, of the fp32 upper factor ``J L^-1 J`` ``[stop - start, K - start]``
    (``lower_inverse`` = ``L^-1`` ``[K, K]`` fp64): one block at a time, never a fp32 copy of the whole."""
    k = lower_inverse.shape[0]
    return lower_inverse[k - stop:k - start, :k - start].flip((0, 1)).to(torch.float32)


def obs_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quant: QuantSpec | None = None,
    prune: PruneSpec | None = None,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    overwrite_hessian: bool = False,
    fixed_mask: torch.Tensor | None = None,
    fixed_grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SweepResult:
    """Run the sweep on ``weight`` ``[N, K]`` with ``hessian`` ``[K, K]`` (any float; computed in fp64).

    ``act_order`` visits columns by decreasing Hessian diagonal; the quantization groups then stay
    the original contiguous ones (static groups, chosen from the unmodified weight before the
    sweep), so the result needs no ``g_idx`` and packs like any other layer. ``overwrite_hessian``:
    the caller hands over ``hessian`` (a fresh fp64 copy), which is then modified instead of copied.
    ``fixed_mask`` (bool ``[N, K]``, instead of ``prune``): the weights to keep are given, and the sweep only
    re-solves them (a merge into a pruned base keeps its mask, so its 2:4 kernels still apply).
    ``fixed_grid`` (``(scales, zeros)`` fp32 ``[G, N]``, contiguous groups): quantize onto this grid instead of
    choosing one (a merge lands on its base's own grid: the weight it starts from is already on it).
    """
    if quant is None and prune is None and fixed_mask is None:
        raise ValueError("obs_sweep needs a quantization spec, a pruning spec or mask, or both")
    if prune is not None and fixed_mask is not None:
        raise ValueError("obs_sweep takes a pruning spec (the sweep chooses the mask) or a fixed mask, not both")
    if act_order and (prune is not None or fixed_mask is not None):
        raise ValueError("act_order is a GPTQ option; it cannot be combined with pruning")
    if fixed_mask is not None and tuple(fixed_mask.shape) != tuple(weight.shape):
        raise ValueError(f"fixed_mask {tuple(fixed_mask.shape)} does not match the weight {tuple(weight.shape)}")
    n, k = weight.shape
    if prune is not None and prune.structured and k % prune.m:
        raise ValueError(f"in_features={k} is not a multiple of m={prune.m} for {prune} sparsity")
    h = hessian.to(dtype=torch.float64, device=weight.device)
    if (h is hessian and not overwrite_hessian) or not h.is_contiguous():  # row-major: its transpose is factored
        h = h.clone(memory_format=torch.contiguous_format)
    del hessian
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0

    group = quant.group(k) if quant else k
    static = None
    perm = None  # column visiting order; None = left to right (no permuted copies of w and h)
    if act_order:
        unvisited = _working_copy(weight, dead)
        grids = [grid_params(unvisited[:, g * group:(g + 1) * group], quant) for g in range(k // group)]
        static = torch.stack([s for s, _ in grids]), torch.stack([z for _, z in grids])
        del unvisited
        perm = torch.argsort(torch.diag(h), descending=True)
    if fixed_grid is not None:
        if quant is None:
            raise ValueError("fixed_grid needs a quantization spec (its bits)")
        static = tuple(t.to(device=weight.device, dtype=torch.float32) for t in fixed_grid)
        if tuple(static[0].shape) != (k // group, n):
            raise ValueError(f"fixed_grid scales {tuple(static[0].shape)} do not match [{k // group}, {n}]")
    # The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in fp64, in h's own memory: the caller's
    # statistics and h are the only K x K matrices alive (13 GB at K = 28672, a 70B down_proj); the sweep
    # reads it a block of rows at a time in fp32. The working copy of the weight is made only after it.
    h.diagonal().add_(damp_percent * torch.mean(torch.diag(h)))
    reverse = perm.flip(0) if perm is not None else torch.arange(k - 1, -1, -1, device=h.device)
    lower_inverse = _upper_inverse_factor(h, reverse, damp_percent)
    del h
    w = _working_copy(weight, dead)
    if perm is not None:
        w = w[:, perm]

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device) if quant else None  # bits <= 8
    scales = torch.zeros(k // group, n, dtype=torch.float32, device=w.device) if quant else None
    zeros = torch.zeros_like(scales) if quant else None
    if static is not None:
        scales, zeros = static
    mask = torch.ones(n, k, dtype=torch.bool, device=w.device) if prune else None
    if fixed_mask is not None:
        mask = fixed_mask.to(device=w.device, dtype=torch.bool).clone()
    scale = zero = None
    # act-order: the static group of each visited column, as Python ints (one transfer, not a device sync
    # per column)
    group_of_column = ((perm if perm is not None else torch.arange(k, device=w.device)) // group).tolist() \
        if static is not None else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        codes1 = torch.empty_like(w1) if quant is not None else None  # the block's codes, stored as uint8 once
        hinv_rows = _inverse_rows(lower_inverse, i1, i2)  # [i2 - i1, K - i1]: the rows of the upper factor
        hinv1 = hinv_rows[:, :i2 - i1]
        pivots = torch.diag(hinv1).tolist() if hinv1.device.type == "cpu" else torch.diag(hinv1)
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
                    g = group_of_column[col]
                    scale, zero = scales[g], zeros[g]
                elif col % group == 0:
                    window = torch.cat([w1[:, i:], w[:, i2:i2 + group]], dim=1)[:, :group]
                    scale, zero = grid_params(window, quant)
                    scales[col // group], zeros[col // group] = scale, zero
                q = quantize_codes(value, scale, zero, quant.maxq)
                if mask is not None:  # a pruned weight sits exactly at the zero point
                    q = torch.where(mask[:, col], q, zero)
                codes1[:, i] = q
                value = scale * (q - zero)
            err = (w1[:, i] - value) / pivots[i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = value
            err1[:, i] = err
        w[:, i1:i2] = w1
        if codes is not None:
            codes[:, i1:i2] = codes1.to(torch.uint8)
        w[:, i2:] -= err1 @ hinv_rows[:, i2 - i1:]

    if perm is not None:  # back to the original column order
        inverse = torch.argsort(perm)
        w = w[:, inverse]
        codes = codes[:, inverse] if codes is not None else None
        mask = mask[:, inverse] if mask is not None else None
    return SweepResult(values=w, codes=codes, scales=scales, zeros=zeros, mask=mask)
