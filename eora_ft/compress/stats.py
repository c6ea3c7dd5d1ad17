"""Activation statistics of a linear layer's input: fp64 ``X^T X`` and an exact token count.

One :class:`ActivationStats` serves every consumer of an input: the GPTQ Hessian, the EoRA
covariance and the ASVD/act-diag scaling all derive from it. Linears that read the very same input
tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one object, so it is
accumulated once per token and its eigendecomposition is computed once.
"""

from __future__ import annotations

import torch
from torch import nn


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
        if not torch.isfinite(x).all():
            raise FloatingPointError("NaN or Inf in calibration activations; check the model dtype and inputs")
        x = x.to(torch.float64)
        self.xtx.addmm_(x.t(), x)  # accumulate in place: no K x K temporary (1.6 GB in fp64 at K = 14336)
        self.tokens += x.shape[0]
        self.batches += 1
        self._eigh = None

    def covariance(self) -> torch.Tensor:
        """Second moment ``C = X^T X / n`` (fp64 ``[K, K]``)."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens were accumulated for this input")
        return self.xtx / self.tokens

    @property
    def has_eigh(self) -> bool:
        """True once :meth:`eigh` has been computed (and cached) for the current statistics."""
        return self._eigh is not None

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``[K]`` (ascending, negatives from round-off kept) and eigenvectors ``[K, K]`` of C, cached."""
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.covariance())
        return self._eigh


class StatsCollector:
    """Forward hooks on a set of linears that accumulate one :class:`ActivationStats` per distinct input.

    Sharing is detected from the first batch: linears whose input is the same tensor object get the
    same stats; later batches accumulate each distinct input exactly once.
    """

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears
        self.stats: dict[str, ActivationStats] = {}
        self.token_mask: torch.Tensor | None = None
        # id -> (tensor, stats); holding the tensor keeps its id from being reused within a batch
        self._batch_inputs: dict[int, tuple[torch.Tensor, ActivationStats]] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]
        self._only: set[str] | None = None

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

        return hook

    def next_batch(self, token_mask: torch.Tensor | None = None) -> None:
        """Call before each forward: forget last batch's tensors, set the padding mask ``[B, L]``."""
        self._batch_inputs.clear()
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
