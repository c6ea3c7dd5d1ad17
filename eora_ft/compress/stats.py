"""Activation statistics of a linear layer's input: fp64 ``X^T X`` and an exact token count.

One :class:`ActivationStats` serves every consumer of an input: the GPTQ Hessian, the EoRA
covariance and the ASVD/act-diag scaling all derive from it. Linears that read the very same input
tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one object, so it is
accumulated once per token and its eigendecomposition is computed once.
"""

from __future__ import annotations

import torch
from torch import nn


STATS_BLOCK = 1024  # rows of X^T X per fp32 product


class ActivationStats:
    """Running ``sum_t x_t x_t^T`` (fp64, ``[K, K]``) over the tokens a layer has seen."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.batches = 0
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_batch(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Accumulate ``x`` ``[..., K]`` (any float dtype); ``token_mask`` ``[...]`` bool drops padding."""
        x = x.reshape(-1, x.shape[-1])
        if token_mask is not None:
            x = x[token_mask.reshape(-1).to(torch.bool)]
        if x.dtype == torch.float64 or x.is_cuda:
            # on a GPU fp64 GEMMs are fast (H100/H200: 60+ TFLOPS) and a fp32 product would silently become
            # TF32 wherever the user's training config turned TF32 on
            self.xtx.addmm_(x.t(), x.to(torch.float64))
        else:
            # one fp32 product per batch (half the time of fp64 on a CPU), summed in fp64 over the batches:
            # each entry has the accuracy of a fp32 sum over one batch's tokens, as the published GPTQ
            # Hessians do, and the running total loses nothing to the number of batches
            x = x.to(torch.float32)
            # by blocks of rows: a fp32 product and its fp64 cast of STATS_BLOCK rows at a time (0.2 GB at
            # K = 14336) instead of the whole K x K pair (2.5 GB)
            for start in range(0, x.shape[1], STATS_BLOCK):
                block = x[:, start:start + STATS_BLOCK]
                self.xtx[start:start + STATS_BLOCK].add_(block.t() @ x)
        # a NaN or Inf anywhere in x makes its column's diagonal entry NaN or Inf: checking the K diagonal
        # entries after the product costs nothing, checking x itself cost a pass over every activation
        if not bool(torch.isfinite(self.xtx.diagonal()).all()):
            raise FloatingPointError("NaN or Inf in calibration activations (or their squares overflow fp32); "
                                     "check the model dtype and inputs")
        self.tokens += x.shape[0]
        self.batches += 1
        self._eigh = None

    def covariance(self) -> torch.Tensor:
        """Second moment ``C = X^T X / n`` (fp64 ``[K, K]``)."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens were accumulated for this input")
        return self.xtx / self.tokens

    def second_moments(self) -> torch.Tensor:
        """``diag(C) = E[x_k^2]`` ``[K]`` fp64 on the statistics' device, read through a view of ``X^T X``'s
        diagonal: no ``K x K`` copy (6.6 GB at K = 28672), the same values as ``torch.diag(covariance())``."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens were accumulated for this input")
        return self.xtx.diagonal() / self.tokens

    @property
    def has_eigh(self) -> bool:
        """True once :meth:`eigh` has been computed (and cached) for the current statistics."""
        return self._eigh is not None

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``[K]`` (ascending, negatives from round-off kept) and eigenvectors ``[K, K]`` of C, cached."""
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.covariance())
        return self._eigh


class StatisticsComplete(Exception):
    """Raised by a :class:`StatsCollector` hook once every linear it collects for has seen this batch: the
    driver stops the layer's forward there (a q/k/v pass skips attention and the MLP)."""


def _energy(module: nn.Module, output: torch.Tensor, token_mask: torch.Tensor | None) -> float:
    """``sum_t ||y_t - bias||^2`` over the unmasked tokens of a linear's output ``[..., N]``: one fp32 norm per
    batch (torch reduces it blockwise, relative error ~1e-6; a fp64 norm converted every output element
    and was a tenth of a small model's compression time), the batches summed in Python floats (fp64)."""
    y = output.detach().reshape(-1, output.shape[-1])
    if token_mask is not None:
        y = y[token_mask.reshape(-1).to(torch.bool)]
    bias = getattr(module, "bias", None)
    if bias is not None:
        y = y - bias.detach()
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    return float(torch.linalg.vector_norm(y, dtype=dtype)) ** 2


class StatsCollector:
    """Forward hooks on a set of linears that accumulate one :class:`ActivationStats` per distinct input.

    Sharing is detected from the first batch: linears whose input is the same tensor object get the
    same stats; later batches accumulate each distinct input exactly once. Once every linear collected for
    has run on a batch, the hook raises :class:`StatisticsComplete` to end that forward. Per linear, ``output_energy``
    sums ``||x W^T||^2`` over the same tokens (fp64, from the outputs the forward computes anyway, bias
    excluded): the denominator of the relative output error without a ``[N, K] x [K, K]`` product.
    """

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears
        self._fired: set[str] = set()
        self.stats: dict[str, ActivationStats] = {}
        self.token_mask: torch.Tensor | None = None
        # id -> (tensor, stats); holding the tensor keeps its id from being reused within a batch
        self._batch_inputs: dict[int, tuple[torch.Tensor, ActivationStats]] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]
        self._only: set[str] | None = None
        self.output_energy: dict[str, float] = {}

    def restrict(self, names: list[str]) -> None:
        """From now on accumulate only the inputs of ``names`` (the others keep what they have)."""
        self._only = set(names)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._only is not None and name not in self._only:
                return
            x = args[0]
            key = id(x)
            seen = self._batch_inputs.get(key)
            shared = seen[1] if seen is not None else None
            if name not in self.stats:
                self.stats[name] = shared or ActivationStats(x.shape[-1], device=x.device)
            stats = self.stats[name]
            if shared is None:
                stats.add_batch(x.detach(), self.token_mask)
                self._batch_inputs[key] = (x, stats)
            self.output_energy[name] = self.output_energy.get(name, 0.0) + _energy(module, output, self.token_mask)
            self._fired.add(name)
            if self._fired.issuperset(self._only if self._only is not None else self.linears):
                raise StatisticsComplete  # the rest of the layer's forward would feed no statistic

        return hook

    def next_batch(self, token_mask: torch.Tensor | None = None) -> None:
        """Call before each forward: forget last batch's tensors, set the padding mask ``[B, L]``."""
        self._batch_inputs.clear()
        self._fired.clear()
        self.token_mask = token_mask

    def distinct(self) -> list[ActivationStats]:
        """The distinct stats objects, in first-seen order."""
        seen: dict[int, ActivationStats] = {}
        for s in self.stats.values():
            seen.setdefault(id(s), s)
        return list(seen.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._batch_inputs.clear()
