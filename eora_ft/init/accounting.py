"""What the layer-by-layer driver reports: its result (factors, per-linear rows, timings) and the relative
output errors of each linear, computed from the statistics alone."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from eora_ft.compress.stats import ActivationStats

from .factors import LowRankFactors


@dataclass
class SequentialResult:
    """Output of :func:`compress_model`.

    Attributes:
        factors: ``{module_path: {init_name: LowRankFactors}}`` (paths as in ``model.named_modules()``).
        layers: one row per linear: relative output error ``||dW X^T|| / ||W X^T||`` before and after
            each init's correction, and each init's effective rank.
        calib_tokens: calibration tokens seen by every layer; seconds: wall time (all of it);
            init_seconds: wall time spent in each initializer; stage_seconds: wall time of the other
            stages (``statistics``: the passes that collect them, ``compressor``, ``errors``: the report's
            output errors, ``layer_outputs``: the pass that feeds the next layer, ``moves``: device moves).
        base_replaced: True when ``base_from`` named an initializer with its own base (LoftQ), whose
            modules were swapped in instead of the compressor's.
        stats, deltas: per linear, its input statistics and ``W - W_c`` ``[N, K]`` fp32 (only with
            ``keep_stats=True``: enough to compute any other initializer afterwards).
        error_curves: ``{module_path: {init_name: [e_0, ..., e_R]}}``, the relative output error of the
            correction truncated to its first ``r`` directions, ``r = 0..R`` (``e_0``: no correction): what
            a rank allocation (:func:`eora_ft.init.rank_budget.allocate_ranks`) trades between linears.
    """

    factors: dict[str, dict[str, LowRankFactors]] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    calib_tokens: int = 0
    seconds: float = 0.0
    init_seconds: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, ActivationStats] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    base_replaced: bool = False  # an initializer's own base (LoftQ's Q_T) replaced the compressed linears
    error_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    output_energies: dict[str, float] = field(default_factory=dict)  # ||W X^T||^2 per linear
    # per mixture-of-experts block: {"layer", "experts", "routed_tokens": [per expert], "threshold",
    # "all_token_experts": [calibrated on every token]} (eora_ft.init.expert_calibration)
    expert_routing: list[dict] = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the body's wall time to ``stage_seconds[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - start


class OutputError:
    """Relative output errors ``||E X^T||_F / ||W X^T||_F`` of one linear, from its fp64 ``X^T X`` (the
    token count cancels), without touching activations or copying the ``K x K`` statistics.

    ``E = dW`` costs one ``[N, K] x [K, K]`` product, reused for every ``E = dW - B A``: the correction's
    terms need only ``A X^T X`` (``[r, K]``). The denominator ``||W X^T||^2`` is ``weight_energy`` when the
    caller has it (:attr:`~eora_ft.compress.stats.StatsCollector.output_energy`, summed from the forward's
    own outputs), else one more such product."""

    def __init__(self, delta: torch.Tensor, weight: torch.Tensor, xtx: torch.Tensor,
                 weight_energy: float | None = None) -> None:
        self.xtx = xtx
        self.delta = delta.to(torch.float64)
        self.delta_term = float((self.delta @ xtx).mul_(self.delta).sum())  # tr(dW C dW^T) * n
        if weight_energy is None:
            w = weight.to(torch.float64)
            weight_energy = float((w @ xtx).mul_(w).sum())
        self.weight_term = weight_energy

    def of(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> float:
        """For ``dW`` (no factors) or ``dW - B A``."""
        num = self.delta_term
        if a is not None:
            a, b = a.to(torch.float64), b.to(torch.float64)
            a_c = a @ self.xtx  # [r, K]
            num += -2.0 * float((a_c * (b.t() @ self.delta)).sum()) + float(((a_c @ a.t()) * (b.t() @ b)).sum())
        return float(max(num, 0.0) / self.weight_term) ** 0.5 if self.weight_term > 0 else 0.0

    def curve(self, a: torch.Tensor, b: torch.Tensor) -> list[float]:
        """Relative errors of ``dW - B[:, :r] A[:r]`` for every ``r`` from 0 to ``rank`` (``rank + 1`` values), at
        the cost of one :meth:`of`: the cross terms are per direction, the quadratic term a prefix sum."""
        a, b = a.to(torch.float64), b.to(torch.float64)
        a_c = a @ self.xtx  # [R, K]
        cross = (a_c * (b.t() @ self.delta)).sum(dim=1)  # [R]
        quad = ((a_c @ a.t()) * (b.t() @ b)).cumsum(0).cumsum(1).diagonal()  # [R]: sum of the leading r x r block
        num = self.delta_term + torch.cat([quad.new_zeros(1), quad - 2.0 * cross.cumsum(0)])
        if self.weight_term <= 0:
            return [0.0] * num.numel()
        return (num.clamp_min(0.0) / self.weight_term).sqrt().tolist()
