"""The one layer-by-layer driver: every compressor and every initializer runs through it.

For each decoder layer (GPTQ's sequential scheme): hooks collect one :class:`ActivationStats` per
distinct linear input while the calibration activations of the already-compressed prefix flow
through the layer; each target linear is compressed and every requested initializer factors its
error from those same statistics; the linears become :class:`CompressedLinear`; the layer's
outputs are recomputed with the compressed weights and feed the next layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from eora_ft.init import LowRankFactors, get_initializer

from .linear import set_module
from .stats import ActivationStats, StatsCollector


@dataclass
class SequentialResult:
    """Output of :func:`compress_model`.

    Attributes:
        factors: ``{module_path: {init_name: LowRankFactors}}`` (paths as in ``model.named_modules()``).
        layers: one row per linear: relative output error ``||dW X^T|| / ||W X^T||`` before and after
            each init's correction, and each init's effective rank.
        calib_tokens: calibration tokens seen by every layer; seconds: wall time (all of it);
            init_seconds: wall time spent in each initializer.
        stats, deltas: per linear, its input statistics and ``W - W_c`` ``[N, K]`` fp32 (only with
            ``keep_stats=True``: enough to compute any other initializer afterwards).
    """

    factors: dict[str, dict[str, LowRankFactors]] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    calib_tokens: int = 0
    seconds: float = 0.0
    init_seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, ActivationStats] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)


CAPTURE_MODES = ("compressed", "compensated")


class _Captured(Exception):
    pass


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM: ``(path, ModuleList)``; raises if the model has none."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if expected is None or len(module) == expected:
                return name, module
    raise ValueError(
        f"no decoder layers found in {type(model).__name__}: expected a ModuleList named 'layers', 'h' or "
        "'blocks' (Llama, Mistral, Qwen, GPT-2 style causal LMs)"
    )


def target_linears(layer: nn.Module, targets: list[str] | None) -> dict[str, nn.Linear]:
    """Linears of one decoder layer whose last name component is in ``targets`` (None = all)."""
    return {
        name: m for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and (targets is None or name.split(".")[-1] in targets)
    }


def _capture_layer_inputs(model: nn.Module, first_layer: nn.Module, calib_ids: torch.Tensor, batch_size: int):
    captured: list[tuple[torch.Tensor, dict]] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "hidden_states")}
        captured.append((hidden.detach(), kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            try:
                model(input_ids=calib_ids[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]], collector: StatsCollector | None = None,
               first_stage_only: bool = False):
    """Run ``layer`` over every calibration batch. With ``first_stage_only``, statistics after the first
    batch (which reveals which linears share an input) accumulate only for the first stage: the later
    stages are re-collected from the partly compressed layer anyway."""
    outputs = []
    for batch, (hidden, kwargs) in enumerate(inputs):
        if collector is not None:
            if batch == 1 and first_stage_only:
                collector.restrict(_stages(collector)[0])
            collector.next_batch()
        out = layer(hidden, **kwargs)
        outputs.append(((out[0] if isinstance(out, tuple) else out).detach(), kwargs))
    return outputs


def _relative_output_error(delta: torch.Tensor, weight: torch.Tensor, cov: torch.Tensor) -> float:
    """``||delta X^T||_F / ||W X^T||_F`` from the covariance, without touching activations."""
    num = torch.einsum("nk,kj,nj->", delta, cov, delta)
    den = torch.einsum("nk,kj,nj->", weight, cov, weight)
    return float(torch.sqrt(num.clamp_min(0) / den))


def _stages(collector: StatsCollector) -> list[list[str]]:
    """Linears grouped by shared input, in execution order: q/k/v, o, gate/up, down for Llama."""
    groups: dict[int, list[str]] = {}
    for name, stats in collector.stats.items():
        groups.setdefault(id(stats), []).append(name)
    return list(groups.values())


@torch.no_grad()
def compress_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    compressor,
    init_methods: list[str] = (),
    rank: int = 16,
    init_options: dict | None = None,
    target_modules: list[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    true_sequential: bool = True,
    factor_bits: int | None = None,
    capture: str = "compressed",
    base_from: str | None = None,
    keep_stats: bool = False,
    progress: bool = True,
) -> SequentialResult:
    """Compress every target linear of ``model`` in place and factor each init's correction.

    Args:
        calib_ids: int64 ``[num_samples, seq_len]`` calibration tokens (no padding).
        compressor: an object from :func:`eora_ft.compress.make_compressor`.
        init_methods: names from :data:`eora_ft.init.INITIALIZERS`, all computed from the same pass.
        true_sequential: within a layer, compress q/k/v first and re-collect the statistics of o,
            then gate/up, then down, from the partly compressed layer (GPTQ's ``--true-sequential``).
        factor_bits: round every init's ``A`` and ``B`` to this many bits (4 or 3; None keeps fp32).
        capture: ``compressed`` (later layers see the compressed prefix: one pass serves every init,
            the fair default) or ``compensated`` (they see compressed + the first init's correction,
            as the EoRA reference code does).
        base_from: an init whose own base (LoftQ's ``Q_T``) replaces the compressor's module.
        keep_stats: keep every linear's statistics and error in the result (benchmarks, sweeps).
    """
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture={capture!r} is not valid; choose one of {CAPTURE_MODES}")
    if capture == "compensated" and not init_methods:
        raise ValueError("capture='compensated' needs at least one init method to compensate with")
    if calib_ids.ndim != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calib_ids must be a non-empty [num_samples, seq_len] tensor, got shape {tuple(calib_ids.shape)}")
    initializers = {name: get_initializer(name) for name in init_methods}
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    prefix, layers = find_decoder_layers(model)
    result = SequentialResult(calib_tokens=int(calib_ids.numel()))
    was_training = model.training
    model.eval()
    inputs = _capture_layer_inputs(model, layers[0], calib_ids, batch_size)

    for index, layer in enumerate(tqdm(layers, desc=f"compress ({type(compressor).__name__})", disable=not progress)):
        linears = target_linears(layer, target_modules)
        if not linears:
            raise ValueError(f"no target linears {target_modules} in decoder layer {index}")
        collector = _collect(layer, inputs, linears, first_stage_only=true_sequential)
        unreached = sorted(set(linears) - set(collector.stats))
        if unreached:
            raise ValueError(f"decoder layer {index}: no calibration activations reached {unreached}; "
                             "they would stay uncompressed (a branch the calibration inputs never take?)")
        stats = dict(collector.stats)
        for stage_index, stage in enumerate(_stages(collector)):
            if true_sequential and stage_index:
                stats.update(_collect(layer, inputs, {name: linears[name] for name in stage}).stats)
            for name in stage:
                path = f"{prefix}.{index}.{name}"
                result.layers.append(_compress_linear(layer, name, linears[name], stats[name], compressor,
                                                      initializers, rank, init_options, generator, result, path,
                                                      factor_bits, base_from, keep_stats))
                if capture == "compensated":
                    factors = result.factors[path][init_methods[0]]
                    set_module(layer, name, _Compensated(layer.get_submodule(name), factors))
        inputs = _run_layer(layer, inputs)
        if capture == "compensated":
            for name, module in list(layer.named_modules()):
                if isinstance(module, _Compensated):
                    set_module(layer, name, module.base)

    model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _collect(layer: nn.Module, inputs, linears: dict[str, nn.Module], first_stage_only: bool = False) -> StatsCollector:
    collector = StatsCollector(linears)
    try:
        _run_layer(layer, inputs, collector, first_stage_only)
    finally:
        collector.remove()
    return collector


class _Compensated(nn.Module):
    """``base(x) + x A^T B^T`` while the driver computes the next layer's inputs (capture='compensated')."""

    def __init__(self, base: nn.Module, factors: LowRankFactors) -> None:
        super().__init__()
        self.base, self.a, self.b = base, factors.a, factors.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.to(x.dtype).t()) @ self.b.to(x.dtype).t()


def _compress_linear(layer, name, linear, stats: ActivationStats, compressor, initializers, rank, init_options,
                     generator, result: SequentialResult, path: str, factor_bits: int | None = None,
                     base_from: str | None = None, keep_stats: bool = False) -> dict:
    """Compress one linear, factor every init's correction, swap the module in; returns its report row."""
    weight = linear.weight.detach().to(torch.float32)
    compressed = compressor.compress(weight, stats).to_module(linear.bias, linear.weight.dtype)
    delta = weight - compressed.dequantize(torch.float32)  # what the stored module really computes
    cov = stats.covariance().to(torch.float32)
    row = {"layer": path, "tokens": stats.tokens, "rel_out_err/compressed": _relative_output_error(delta, weight, cov)}
    result.factors[path] = {}
    if keep_stats:
        result.stats[path], result.deltas[path] = stats, delta
    for init_name, init in initializers.items():
        started = time.perf_counter()
        factors = init(delta, stats, rank, generator=generator, weight=weight, compressor=compressor,
                       **(init_options or {}).get(init_name, {}))
        result.init_seconds[init_name] = result.init_seconds.get(init_name, 0.0) + time.perf_counter() - started
        if factor_bits:
            factors = factors.quantized(factor_bits)
        own_delta = delta
        if factors.base is not None:  # LoftQ: the correction belongs to its own base Q_T
            own_base = factors.base.to_module(linear.bias, linear.weight.dtype)
            own_delta = weight - own_base.dequantize(torch.float32)
            if init_name == base_from:
                compressed = own_base
        result.factors[path][init_name] = factors
        row[f"rel_out_err/{init_name}"] = _relative_output_error(own_delta - factors.delta(), weight, cov)
        row[f"effective_rank/{init_name}"] = factors.effective_rank
    set_module(layer, name, compressed)
    return row
