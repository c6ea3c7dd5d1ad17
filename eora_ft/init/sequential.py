"""The one layer-by-layer driver: every compressor and every initializer runs through it.

For each decoder layer (GPTQ's sequential scheme): hooks collect one :class:`ActivationStats` per
distinct linear input while the calibration activations of the already-compressed prefix flow
through the layer; each target linear is compressed and every requested initializer factors its
error from those same statistics; the linears become :class:`CompressedLinear`; the layer's
outputs are recomputed with the compressed weights and feed the next layer.

Only one decoder layer is ever on the execution device (GPTQModel's and llm-compressor's scheme): the
model stays where it was loaded (the CPU for a 70B model), each layer moves to the accelerator with
its calibration activations, is compressed there, and moves back packed. Peak accelerator memory is
one layer, its activations and its statistics, whatever the model's size.

Statistics are collected only when something reads them: a compressor with ``needs_stats``, an initializer
in :data:`~eora_ft.init.STATISTICS_INITS` (or a rebasing one over such a compressor), ``keep_stats`` or
``output_errors``. RTN or NF4 with qlora or svd runs no calibration forward and accumulates no fp64 ``X^T X``
(about 15 minutes of fp64 GEMMs at 70B); its report rows then carry no output errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from eora_ft.compress import needs_statistics
from eora_ft.compress.experts import expert_pattern, is_expert_linear_path
from eora_ft.compress.linear import set_module
from eora_ft.compress.stats import ActivationStats, StatisticsComplete, StatsCollector

from . import get_initializer, init_needs_statistics
from .accounting import OutputError, SequentialResult
from .expert_calibration import DEFAULT_MIN_SHARE, calibrate_under_routed, release
from .factors import LowRankFactors


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


def no_linears_error(layer: nn.Module, targets: list[str] | None, where: str) -> ValueError:
    """The error for a decoder layer with no target ``nn.Linear``: GPT-2-style ``Conv1D`` layers (weight stored
    ``[in, out]``) are named as such; otherwise the linear names that are there."""
    conv1d = sorted({name.split(".")[-1] for name, module in layer.named_modules() if type(module).__name__ == "Conv1D"})
    if conv1d:
        return ValueError(f"{where} computes with transformers Conv1D layers {conv1d} (GPT-2 style, weight stored "
                          "[in, out]), not nn.Linear: eora_ft compresses and adapts nn.Linear layers only")
    names = sorted({name.split(".")[-1] for name, module in layer.named_modules() if isinstance(module, nn.Linear)})
    return ValueError(f"target modules {targets} match no linear in {where}; names there: {names}")


def _to_device(value, device: torch.device):
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _capture_layer_inputs(model: nn.Module, first_layer: nn.Module, calib_ids: torch.Tensor, batch_size: int,
                          store_on: torch.device | None) -> list[tuple[torch.Tensor, dict]]:
    """The first decoder layer's input (hidden states + keyword arguments such as rotary embeddings and
    masks) for every calibration batch, computed by the model's prefix where it lives, kept on ``store_on``
    (None: where the prefix produced them)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "hidden_states")}
        device = store_on or hidden.device
        captured.append((hidden.detach().to(device), _to_device(kwargs, device)))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    device = model.get_input_embeddings().weight.device
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
               first_stage_only: bool = False, run_on: torch.device | None = None, store_on: torch.device | None = None):
    """Run ``layer`` over every calibration batch (each moved to ``run_on``, its output kept on ``store_on``;
    None = where it is). With ``first_stage_only``, statistics after the first batch (which reveals
    which linears share an input) accumulate only for the first stage: the later stages are
    re-collected from the partly compressed layer anyway. A collecting pass returns no outputs: each forward
    ends as soon as its statistics are complete (:class:`~eora_ft.compress.stats.StatisticsComplete`)."""
    outputs = []
    for batch, (hidden, kwargs) in enumerate(inputs):
        if collector is not None:
            if batch == 1 and first_stage_only:
                collector.restrict(_stages(collector)[0])
            collector.next_batch()
        try:
            if run_on is None:
                out = layer(hidden, **kwargs)
            else:
                out = layer(hidden.to(run_on), **_to_device(kwargs, run_on))
        except StatisticsComplete:
            continue
        if collector is not None:
            continue
        out = (out[0] if isinstance(out, tuple) else out).detach()
        outputs.append((out if store_on is None else out.to(store_on), kwargs))
    return outputs


def _require_finite(inputs: list[tuple[torch.Tensor, dict]], where: str) -> None:
    """Raise if a calibration activation overflowed: every later Hessian and error would be NaN. One
    device sync per layer (the per-batch flags are reduced on the device first)."""
    if not inputs:
        return
    finite = torch.stack([torch.isfinite(hidden).all().to(inputs[0][0].device) for hidden, _ in inputs]).all()
    if not bool(finite):
        dtype = inputs[0][0].dtype
        limit = f" (largest finite {torch.finfo(dtype).max:.6g})" if dtype.is_floating_point else ""
        raise FloatingPointError(
            f"calibration activations overflow at {where}: NaN/Inf in {dtype}{limit}. Load the model in a wider "
            "dtype (dtype: bfloat16 or float32; fp16 checkpoints of large models often exceed fp16's range), "
            "or check the weights for huge values")


def _layer_home(layer: nn.Module) -> torch.device:
    """Where a decoder layer's weights live (refusing weights that are not there: meta / disk offload)."""
    for tensor in [*layer.parameters(), *layer.buffers()]:
        if tensor.device.type == "meta":
            raise ValueError("a decoder layer has weights on the meta device (accelerate disk/CPU offload through a "
                             "device_map): load the model without a device_map, on the CPU; eora_ft moves one "
                             "layer at a time to the accelerator itself")
        return tensor.device
    return torch.device("cpu")


def _movable(layer: nn.Module) -> bool:
    """False for a layer placed by accelerate's device_map hooks: they move its inputs to where its
    weights are, so it runs where it is."""
    return not any(hasattr(module, "_hf_hook") for module in layer.modules())


def _stages(collector: StatsCollector) -> list[list[str]]:
    """Linears grouped by shared input, in execution order: q/k/v, o, gate/up, down for Llama."""
    return _stages_of(collector.stats)


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
    true_sequential: bool = False,
    factor_bits: int | None = None,
    capture: str = "compressed",
    base_from: str | None = None,
    keep_stats: bool = False,
    progress: bool = True,
    execution_device: torch.device | str | None = None,
    activations_device: torch.device | str | None = None,
    precompressed: dict[str, nn.Module] | None = None,
    output_errors: bool | None = None,
    before_layer: Callable[[int, nn.Module], None] | None = None,
    expert_min_share: float = DEFAULT_MIN_SHARE,
) -> SequentialResult:
    """Compress every target linear of ``model`` in place and factor each init's correction.

    Args:
        calib_ids: int64 ``[num_samples, seq_len]`` calibration tokens (no padding), any device.
        compressor: an object from :func:`eora_ft.compress.make_compressor` (None only with ``precompressed``
            and no initializer that re-compresses).
        init_methods: names from :data:`eora_ft.init.INITIALIZERS`, all computed from the same pass.
        true_sequential: within a layer, compress q/k/v first and re-collect the statistics of o,
            then gate/up, then down, from the partly compressed layer (GPTQ's ``--true-sequential``); False: every
            linear's statistics from one pass over the layer (llm-compressor's scheme; no worse on the nano
            model's held-out text and a quarter faster, BENCHMARKS.md).
        factor_bits: round every init's ``A`` and ``B`` to this many bits (4 or 3; None keeps fp32).
        capture: ``compressed`` (later layers see the compressed prefix: one pass serves every init,
            the fair default) or ``compensated`` (they see compressed + the first init's correction,
            as the EoRA reference code does).
        base_from: an init whose own base (LoftQ's ``Q_T``) replaces the compressor's module.
        keep_stats: keep every linear's statistics and error in the result (benchmarks, sweeps).
        execution_device: where each decoder layer is moved, one at a time, to be compressed (None: where
            it is). The model stays where it was loaded; each layer returns there compressed.
        activations_device: where the calibration activations live between layers (None: the execution
            device; ``"cpu"`` for long calibration sets on a small accelerator).
        precompressed: ``{module_path: module}`` linears already compressed (a saved compressed model):
            used as ``W_c`` instead of calling the compressor, e.g. to initialise adapters afterwards.
        output_errors: report each linear's relative output error (rows' ``rel_out_err/*``, ``error_curves``,
            ``output_energies``: what a rank budget allocates from). None: when the statistics are collected
            anyway; True: collect them for the report alone; False: never.
        before_layer: called as ``before_layer(index, layer)`` once the layer is on the execution device, before
            its target linears are found (a merge turns its adapted linears into dense ``W_c + s B A`` there, one
            layer at a time). A compressor with a ``for_linear(path)`` method is asked for each linear's own
            compressor (a merge keeps each layer's grid and mask).
        expert_min_share: a mixture-of-experts expert (unfused: :func:`eora_ft.compress.experts.unfuse_experts`)
            routed fewer calibration tokens than this share of its uniform share is calibrated on every token
            reaching its block (:mod:`eora_ft.init.expert_calibration`); the counts are in ``result.expert_routing``
            and in its linears' rows (``routed_tokens``).
    Returns the factors on each layer's home device (fp32).
    """
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture={capture!r} is not valid; choose one of {CAPTURE_MODES}")
    if capture == "compensated" and not init_methods:
        raise ValueError("capture='compensated' needs at least one init method to compensate with")
    if calib_ids.ndim != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calib_ids must be a non-empty [num_samples, seq_len] tensor, got shape {tuple(calib_ids.shape)}")
    if compressor is None and precompressed is None:
        raise ValueError("compress_model needs a compressor, or precompressed modules for every target linear")
    initializers = {name: get_initializer(name) for name in init_methods}
    prefix, layers = find_decoder_layers(model)
    paths = [f"{prefix}.{index}.{name}" for index, layer in enumerate(layers)
             for name in target_linears(layer, target_modules)]
    # without precompressed modules every linear is compressed (paths may be empty until before_layer makes them)
    compressor_runs = precompressed is None or any(path not in precompressed for path in paths)
    collect = (bool(keep_stats or output_errors)
               or (compressor_runs and needs_statistics(compressor))
               or any(init_needs_statistics(name, compressor) for name in init_methods))
    generator = torch.Generator().manual_seed(seed)  # CPU: the same draws whichever device compresses
    execution_device = torch.device(execution_device) if execution_device is not None else None
    activations_device = torch.device(activations_device) if activations_device is not None else execution_device
    start = time.perf_counter()
    result = SequentialResult(calib_tokens=int(calib_ids.numel()))
    was_training = model.training
    model.eval()
    inputs = []  # without statistics no activation is ever computed: the linears are compressed from weights alone
    if collect:
        inputs = _capture_layer_inputs(model, layers[0], calib_ids, batch_size, activations_device)
        _require_finite(inputs, "the input of decoder layer 0 (the embeddings)")
    context = _LinearContext(compressor, initializers, rank, init_options or {}, generator, result, factor_bits,
                             base_from, keep_stats, precompressed or {}, output_errors is not False)

    for index, layer in enumerate(tqdm(layers, desc=f"compress ({type(compressor).__name__})", disable=not progress)):
        home = _layer_home(layer)
        run_on = execution_device if execution_device is not None and _movable(layer) else home
        with result.timed("moves"):
            layer.to(run_on)
        if before_layer is not None:
            before_layer(index, layer)
        linears = target_linears(layer, target_modules)
        if not linears:
            raise no_linears_error(layer, target_modules, f"decoder layer {index}")
        if collect:
            with result.timed("statistics"):
                collector = _collect(layer, inputs, linears, first_stage_only=true_sequential, run_on=run_on)
            # an expert the routed pass never reached is calibrated on every token below
            unreached = sorted(name for name in set(linears) - set(collector.stats) if not is_expert_linear_path(name))
            if unreached:
                raise ValueError(f"decoder layer {index}: no calibration activations reached {unreached}; "
                                 "they would stay uncompressed (a branch the calibration inputs never take?)")
            stages = _stages_of(collector.stats, linears)
            # under true-sequential the later stages are re-collected from the partly compressed layer
            stats = {name: collector.stats[name] for name in (stages[0] if true_sequential else collector.stats)}
            energies = {name: collector.output_energy[name] for name in stats}
            del collector
        else:
            stages, stats, energies = [list(linears)], dict.fromkeys(linears), dict.fromkeys(linears)
        decided: dict[str, dict] = {}
        routed: dict[str, int] = {}

        def under_routed(names: list[str]) -> None:
            with result.timed("statistics"):
                routed.update(calibrate_under_routed(
                    layer, names, stats, energies, lambda subset: _collect(layer, inputs, subset, run_on=run_on),
                    expert_min_share, decided, f"decoder layer {index}"))

        if collect and not true_sequential:
            under_routed(list(linears))
        for stage_index, stage in enumerate(stages):
            if collect and true_sequential:
                if stage_index:
                    with result.timed("statistics"):
                        stage_collector = _collect(layer, inputs, {name: linears[name] for name in stage}, run_on=run_on)
                    stats.update(stage_collector.stats)
                    energies.update(stage_collector.output_energy)
                    del stage_collector  # its statistics must not outlive the layer
                under_routed(stage)
            for name in stage:
                path = f"{prefix}.{index}.{name}"
                # pop: the original fp32 linear goes as soon as its packed replacement is in
                row = _compress_linear(layer, name, linears.pop(name), stats.pop(name), energies.pop(name), context,
                                       path, home)
                if name in routed:
                    row["routed_tokens"] = routed[name]
                result.layers.append(row)
                if capture == "compensated":
                    factors = result.factors[path][init_methods[0]]
                    set_module(layer, name, _Compensated(layer.get_submodule(name), factors))
        result.expert_routing.extend({"layer": index, **report} for report in decided.values())
        release(layer)
        if collect:
            with result.timed("layer_outputs"):
                inputs = _run_layer(layer, inputs, run_on=run_on, store_on=activations_device)
                _require_finite(inputs, f"the output of decoder layer {index}")
        if capture == "compensated":
            for name, module in list(layer.named_modules()):
                if isinstance(module, _Compensated):
                    set_module(layer, name, module.base)
        with result.timed("moves"):
            layer.to(home)

    model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _collect(layer: nn.Module, inputs, linears: dict[str, nn.Module], first_stage_only: bool = False,
             run_on: torch.device | None = None) -> StatsCollector:
    collector = StatsCollector(linears)
    try:
        _run_layer(layer, inputs, collector, first_stage_only, run_on=run_on)
    finally:
        collector.remove()
    return collector


def _stages_of(stats: dict[str, ActivationStats], names=()) -> list[list[str]]:
    """Linears grouped by shared statistics, in first-seen order (= execution order). The experts of a
    mixture-of-experts block make one stage per projection (every expert's gate/up, then every expert's down:
    true-sequential re-collects twice per block, not twice per expert), and a linear of ``names`` the routed
    pass never reached (an expert no calibration token picked) joins its siblings' stage."""
    groups: dict[int, list[str]] = {}
    for name, entry in stats.items():
        groups.setdefault(id(entry), []).append(name)
    stages: dict[tuple[str, ...], list[str]] = {}
    stage_of: dict[str, tuple[str, ...]] = {}
    for group in groups.values():
        key = tuple(sorted({expert_pattern(name) for name in group}))
        stages.setdefault(key, []).extend(group)
        stage_of.update(dict.fromkeys(key, key))
    for name in names:
        if name not in stats:
            key = stage_of.setdefault(expert_pattern(name), (expert_pattern(name),))
            stages.setdefault(key, []).append(name)
    return list(stages.values())


class _Compensated(nn.Module):
    """``base(x) + x A^T B^T`` while the driver computes the next layer's inputs (capture='compensated')."""

    def __init__(self, base: nn.Module, factors: LowRankFactors) -> None:
        super().__init__()
        self.base, self.a, self.b = base, factors.a, factors.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a.to(device=x.device, dtype=x.dtype), self.b.to(device=x.device, dtype=x.dtype)
        return self.base(x) + (x @ a.t()) @ b.t()


@dataclass
class _LinearContext:
    """What every linear of a run is compressed and factored with."""

    compressor: object
    initializers: dict
    rank: int
    init_options: dict
    generator: torch.Generator
    result: SequentialResult
    factor_bits: int | None
    base_from: str | None
    keep_stats: bool
    precompressed: dict[str, nn.Module]
    output_errors: bool  # report output errors whenever the statistics are there


def _compress_linear(layer, name, linear, stats: ActivationStats | None, weight_energy: float | None,
                     ctx: _LinearContext, path: str, home: torch.device) -> dict:
    """Compress one linear, factor every init's correction, swap the module in; returns its report row (its
    output errors only when ``stats`` were collected and ``ctx.output_errors``).

    Factors are stored on ``home`` (the layer's own device) and an init's own base (LoftQ's ``Q_T``) is
    packed at once and not kept: nothing per layer outlives the layer but its factors and its row."""
    weight = linear.weight.detach().to(torch.float32)
    result = ctx.result
    with result.timed("compressor"):
        if path in ctx.precompressed:
            compressed = ctx.precompressed[path].to(weight.device)
        else:
            compressor = ctx.compressor.for_linear(path) if hasattr(ctx.compressor, "for_linear") else ctx.compressor
            compressed = compressor.compress(weight, stats).to_module(linear.bias, linear.weight.dtype)
        delta = weight - compressed.dequantize(torch.float32)  # what the stored module really computes
    row, errors = {"layer": path}, None
    if stats is not None and ctx.output_errors:
        with result.timed("errors"):
            errors = OutputError(delta, weight, stats.xtx, weight_energy)
        row |= {"tokens": stats.tokens, "rel_out_err/compressed": errors.of()}
        result.output_energies[path] = errors.weight_term
    result.factors[path] = {}
    if ctx.keep_stats:
        result.stats[path], result.deltas[path] = stats, delta
    for init_name, init in ctx.initializers.items():
        started = time.perf_counter()
        factors = init(delta, stats, ctx.rank, generator=ctx.generator, weight=weight, compressor=ctx.compressor,
                       **ctx.init_options.get(init_name, {}))
        result.init_seconds[init_name] = result.init_seconds.get(init_name, 0.0) + time.perf_counter() - started
        if ctx.factor_bits:
            factors = factors.quantized(ctx.factor_bits)
        own_errors = errors
        if factors.base is not None:  # LoftQ: the correction belongs to its own base Q_T
            own_base = factors.base.to_module(linear.bias, linear.weight.dtype)
            if errors is not None:
                own_errors = OutputError(weight - own_base.dequantize(torch.float32), weight, stats.xtx, weight_energy)
            if init_name == ctx.base_from:
                compressed, result.base_replaced = own_base, True
            factors.base = None  # packed above (or unused): its int64 codes must not pile up over the layers
        if own_errors is not None:
            with result.timed("errors"):
                curve = own_errors.curve(factors.a, factors.b)
            row[f"rel_out_err/{init_name}"] = curve[-1]
            result.error_curves.setdefault(path, {})[init_name] = curve
        row[f"effective_rank/{init_name}"] = factors.effective_rank
        result.factors[path][init_name] = factors.to(home)
    set_module(layer, name, compressed)
    return row
