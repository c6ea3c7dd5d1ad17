"""The initial adapter of a compressed model, computed one way for every caller.

A recipe's init cache entry (:func:`eora_ft.run.artifacts.build_init`) and ``eora-ft init`` both run
:func:`initial_adapter`: the uncompressed model goes through the layer-by-layer driver with the saved
compressed linears swapped in (each layer's statistics come from the compressed prefix, or the compensated
one with ``capture: compensated``), the initializer factors ``W - W_c``, a rank budget re-ranks the factors
when asked, PEFT wraps the model, and a refinement trains the factors toward the uncompressed model's
hidden states when asked. Every knob of :class:`~eora_ft.config.AdapterInitArguments` is honoured here, so
the command line and the recipes cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from peft import PeftModel
from torch import nn

from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
from eora_ft.config import AdapterInitArguments, EoraModelConfig
from eora_ft.init.expert_calibration import DEFAULT_MIN_SHARE
from eora_ft.init.sequential import compress_model, find_decoder_layers, target_linears
from eora_ft.utils.placement import fits_on


HOST_SHARE = 0.5  # of the host's available memory the refinement's teacher may take (the models need the rest)


@dataclass
class InitialAdapter:
    """``peft_model``: the model (compressed linears, LoRA factors loaded) on the CPU; ``base_replaced``: the
    initializer rewrote the base (LoftQ's ``Q_T``, eora_alt's best iterate), which the caller saved through
    ``save_rewritten_base``; ``meta``: what a cache entry records (per-layer errors, calibration tokens,
    timings, the rank budget and the refinement when they ran)."""

    peft_model: PeftModel
    base_replaced: bool
    meta: dict


def initial_adapter(model: nn.Module, compressed: dict[str, nn.Module], compressor, adapter_calib: torch.Tensor,
                    init_args: AdapterInitArguments, model_args: EoraModelConfig, seed: int, *, batch_size: int,
                    true_sequential: bool, calib_seed: int, save_rewritten_base: Callable[[nn.Module], None],
                    expert_min_share: float = DEFAULT_MIN_SHARE,
                    execution_device: torch.device | None = None, activations_device: torch.device | None = None,
                    progress: bool = True) -> InitialAdapter:
    """Factor ``W - W_c`` for every linear of ``compressed`` and return the PEFT model holding the factors.

    ``model``: the uncompressed model (CPU; its target linears are replaced in place by ``compressed``'s or,
    for a rebasing initializer, by its own base). ``compressed``: ``{module_path: CompressedLinear}`` of the
    saved base. ``compressor``: the base's compressor (used by LoftQ / eora_alt; None otherwise).
    ``adapter_calib``: int64 ``[samples, seq_len]`` token ids. ``save_rewritten_base(model)`` is called
    before PEFT wraps the model when the initializer rewrote the base, so the caller can write it.
    ``calib_seed`` orders the refinement's batches (as it drew the calibration windows): the run's ``seed``
    varies fine-tuning and seeded initializers, not a refinement shared by every seed."""
    teacher = None
    if init_args.refine_steps:  # the uncompressed model's hidden states, before it is compressed in place
        from eora_ft.init.refine import teacher_hidden_states

        check_teacher_fits(model, adapter_calib, init_args.refine_target)
        teacher = teacher_hidden_states(model, adapter_calib, batch_size, execution_device or "cpu",
                                        init_args.refine_target)
    targets = model_args.lora_target_modules
    rank = model_args.lora_r
    if init_args.rank_allocation == "budget":  # factor wide, then spend the budget (_spend_budget)
        rank = max_budget_rank(model, targets, model_args.lora_r, init_args.rank_max_factor)
    method = init_args.init_method
    result = compress_model(model, adapter_calib, compressor, [method], rank=rank, init_options=init_args.options(),
                            target_modules=targets, batch_size=batch_size, seed=seed, true_sequential=true_sequential,
                            expert_min_share=expert_min_share,
                            factor_bits=init_args.factor_bits, capture=init_args.capture, base_from=method,
                            progress=progress, execution_device=execution_device,
                            activations_device=activations_device, precompressed=compressed,
                            # the budget spends ranks by each linear's output-error curve, whatever the init
                            output_errors=True if init_args.rank_allocation == "budget" else None)
    if result.base_replaced:
        save_rewritten_base(model)
    factors = {path: per_init[method] for path, per_init in result.factors.items()}
    meta: dict = {}
    if init_args.rank_allocation == "budget":
        factors, meta["rank_budget"] = _spend_budget(factors, result, init_args, model_args.lora_r)
    config = lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, targets)
    peft_model = build_lora_model(model, factors, config, trim_to_effective_rank=init_args.trim_rank)
    if teacher is not None:
        meta["refine"] = _refine(peft_model, adapter_calib, teacher, init_args, batch_size, calib_seed,
                                 execution_device)
    return InitialAdapter(peft_model, result.base_replaced,
                          meta | {"adapter_calib_tokens": result.calib_tokens, "layers": result.layers,
                                  "init_seconds": result.init_seconds})


def _refine(peft_model: PeftModel, adapter_calib: torch.Tensor, teacher: torch.Tensor,
            init_args: AdapterInitArguments, batch_size: int, seed: int, execution_device: torch.device | None) -> dict:
    from eora_ft.init.refine import refine_adapters

    device = torch.device(execution_device or "cpu")
    if not fits_on(peft_model, device):  # training cannot stream layers the way inference does
        raise ValueError(f"refine_steps trains the whole compressed model at once: it does not fit on {device}; "
                         "set refine_steps: 0 or use a larger device")
    peft_model.to(device)
    report = refine_adapters(peft_model, adapter_calib, teacher, init_args.refine_steps,
                             init_args.refine_learning_rate, batch_size, seed,
                             micro_batch_size=init_args.refine_micro_batch_size)
    peft_model.to("cpu")
    return {k: v for k, v in report.items() if k != "losses"} | {"losses": report["losses"][::10]}


def teacher_bytes(model: nn.Module, adapter_calib: torch.Tensor, target: str) -> int:
    """Host bytes of the refinement's teacher (:func:`eora_ft.init.refine.teacher_hidden_states`): fp32 final hidden
    states, or every layer's in the model's dtype."""
    config, dtype = model.config, next(model.parameters()).dtype
    states = adapter_calib.numel() * config.hidden_size
    return states * 4 if target == "final" else states * config.num_hidden_layers * dtype.itemsize


def check_teacher_fits(model: nn.Module, adapter_calib: torch.Tensor, target: str) -> None:
    """Refuse, before any work, a teacher larger than :data:`HOST_SHARE` of the host's available memory (``layers``
    at 70B: 344 GB for 128 x 2048 calibration tokens), naming what would fit."""
    import psutil

    need, available = teacher_bytes(model, adapter_calib, target), psutil.virtual_memory().available
    if need > HOST_SHARE * available:
        final = teacher_bytes(model, adapter_calib, "final")
        raise ValueError(f"refine_target={target!r} keeps {need / 1e9:.1f} GB of teacher hidden states on the host "
                         f"({adapter_calib.shape[0]} windows of {adapter_calib.shape[1]} tokens), more than "
                         f"{HOST_SHARE:.0%} of the {available / 1e9:.1f} GB available: use refine_target: final "
                         f"({final / 1e9:.1f} GB), fewer adapter_calib_num_samples, or refine_steps: 0")


def max_budget_rank(model: nn.Module, targets: list[str] | None, lora_r: int, factor: int) -> int:
    """The rank every linear is factored at before a budget is spent: ``factor * lora_r``, at most the
    smallest ``min(N, K)`` of the targets."""
    _, layers = find_decoder_layers(model)
    smallest = min(min(m.in_features, m.out_features) for m in target_linears(layers[0], targets).values())
    return max(lora_r, min(factor * lora_r, smallest))


def _spend_budget(factors: dict, result, init_args: AdapterInitArguments, lora_r: int) -> tuple[dict, dict]:
    """Truncate each linear's factors to its share of the budget (:func:`eora_ft.init.rank_budget.allocate_ranks`)."""
    from eora_ft.init.rank_budget import allocate_ranks

    costs = {path: f.a.shape[1] + f.b.shape[0] for path, f in factors.items()}  # K + N per direction
    budget = init_args.rank_budget or lora_r * sum(costs.values())
    curves = {path: result.error_curves[path][init_args.init_method] for path in factors}
    ranks = allocate_ranks(curves, costs, budget, energies=result.output_energies,
                           normalisation=init_args.rank_normalisation)
    spent = sum(ranks[path] * costs[path] for path in ranks)
    for row in result.layers:  # the report's errors at the ranks kept, not at the wide factorisation
        row[f"rel_out_err/{init_args.init_method}"] = curves[row["layer"]][ranks[row["layer"]]]
        row[f"rank/{init_args.init_method}"] = ranks[row["layer"]]
    report = {"budget": budget, "spent": spent, "normalisation": init_args.rank_normalisation, "ranks": ranks,
              "rel_out_err": {path: curves[path][ranks[path]] for path in ranks}}
    return {path: f.truncate(ranks[path]) for path, f in factors.items()}, report
