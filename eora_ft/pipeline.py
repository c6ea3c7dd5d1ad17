"""The one natural path of a recipe: load -> evaluate -> compress + init -> evaluate -> train -> evaluate -> report.

Stages evaluated: ``base`` (uncompressed), ``compressed``, ``compensated`` (initial adapter, before
training) and ``finetuned``. Recipes parse their config and call :func:`run`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from eora_ft.compress import USES_BITS, make_compressor
from eora_ft.compress.sequential import compress_model, find_decoder_layers, target_linears
from eora_ft.config import AdapterInitArguments, CompressionArguments, EoraModelConfig, EoraSFTConfig, TaskArguments
from eora_ft.data import arc_sft_dataset, load_arc, mixed_calibration, read_text, resolve_path
from eora_ft.data.sources import _looks_like_hub_id
from eora_ft.data.task_text import task_texts
from eora_ft.evaluate import evaluate_stage
from eora_ft.init import check_rank
from eora_ft.peft_bridge import build_lora_model, lora_config, save_adapter, trainable_summary
from eora_ft.report import write_results
from eora_ft.train import loss_history, train_adapters

logger = logging.getLogger("eora_ft")


def require_source(path_or_id: str | None, what: str, hub_ok: bool = True) -> str | None:
    """Resolve a local path (cwd, then repo root) or accept a hub id; raise naming ``what`` otherwise."""
    if path_or_id is None:
        return None
    resolved = resolve_path(path_or_id)
    if os.path.exists(resolved) or (hub_ok and _looks_like_hub_id(path_or_id)):
        return resolved
    raise FileNotFoundError(
        f"{what} {path_or_id!r} does not exist (looked relative to {os.getcwd()!r} and the eora_ft checkout); "
        f"give an existing local path{' or a Hugging Face hub id (org/name)' if hub_ok else ''}"
    )


def load_model(model_args: EoraModelConfig):
    """Tokenizer and causal LM via ``from_pretrained`` (hub id, or local dir; works with HF_HUB_OFFLINE=1)."""
    path = require_source(model_args.model_name_or_path, "model_name_or_path")
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation,
    )
    return tokenizer, model


def check_model_against_config(model: torch.nn.Module, targets: list[str] | None, compress_args: CompressionArguments,
                               rank: int | None = None) -> None:
    """Fail before any work if the targets, the rank or the group size cannot fit the model's linears."""
    _, layers = find_decoder_layers(model)
    linears = target_linears(layers[0], targets)
    if not linears:
        names = sorted({n.split(".")[-1] for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"target modules {targets} match no linear in {type(model).__name__}; names there: {names}")
    for name, linear in linears.items():
        if rank is not None:
            check_rank(rank, linear.in_features, linear.out_features, name)
        if compress_args.compress_method in USES_BITS and compress_args.group_size != -1 and linear.in_features % compress_args.group_size:
            raise ValueError(f"group_size={compress_args.group_size} does not divide in_features={linear.in_features} of {name}; "
                             "use a divisor or -1 (per channel)")


def run(task_args: TaskArguments, compress_args: CompressionArguments, init_args: AdapterInitArguments,
        training_args: EoraSFTConfig, model_args: EoraModelConfig) -> dict:
    """Run the whole recipe and return the results dict (also written to ``output_dir``)."""
    state = PartialState()
    main = state.is_main_process
    progress = main and not training_args.disable_tqdm
    transformers.set_seed(training_args.seed)
    for source, what in [(task_args.dataset_name, "dataset_name"), (task_args.eval_dataset_name, "eval_dataset_name"),
                         (task_args.ppl_dataset, "ppl_dataset"), (compress_args.calib_task_dataset, "calib_task_dataset"),
                         *[(part, "calib_dataset") for part in compress_args.calib_dataset.split(",")]]:
        require_source(source.strip() if source else source, what)
    if task_args.ppl_dataset and any(resolve_path(part.strip()) == resolve_path(task_args.ppl_dataset)
                                     for part in compress_args.calib_dataset.split(",")):
        raise ValueError(f"calib_dataset includes {task_args.ppl_dataset!r}, the perplexity text: calibrating on the "
                         "evaluation text would leak it into the metric; use C4 or another split")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    tokenizer, model = load_model(model_args)
    model.to(state.device)  # compression, statistics and evaluation run where training will
    check_model_against_config(model, model_args.lora_target_modules, compress_args, model_args.lora_r)
    eval_source = task_args.eval_dataset_name or task_args.dataset_name
    eval_items = load_arc(resolve_path(eval_source), split=task_args.dataset_test_split, name=task_args.dataset_config,
                          limit=task_args.eval_limit)
    train_items = load_arc(resolve_path(task_args.dataset_name), split=task_args.dataset_train_split,
                           name=task_args.dataset_config, limit=task_args.train_limit)
    ppl_text = read_text(resolve_path(task_args.ppl_dataset)) if task_args.ppl_dataset else None
    train_dataset = arc_sft_dataset(train_items)
    if compress_args.calib_task_dataset:
        calib_task = task_texts(compress_args.calib_task_format, resolve_path(compress_args.calib_task_dataset))
    else:
        calib_task = [p + c for p, c in zip(train_dataset["prompt"], train_dataset["completion"])]
    calib = mixed_calibration(tokenizer, compress_args.calib_dataset, calib_task,
                              compress_args.calib_num_samples, compress_args.calib_seq_len,
                              task_fraction=compress_args.calib_task_fraction, seed=compress_args.calib_seed)
    lap("load")

    def evaluate(stage_model, with_ppl: bool = True) -> dict:
        if not main:
            return {}
        return evaluate_stage(stage_model, tokenizer, eval_items, ppl_text if with_ppl else None,
                              ppl_window=task_args.ppl_window, ppl_max_windows=task_args.ppl_max_windows,
                              batch_size=task_args.eval_batch_size, progress=progress)

    stages = {"base": evaluate(model)}
    lap("eval_base")

    compressor = make_compressor(compress_args.compress_method, **compress_args.compressor_options())
    sequential = compress_model(model, calib, compressor, [init_args.init_method], rank=model_args.lora_r,
                                init_options=init_args.options(), target_modules=model_args.lora_target_modules,
                                batch_size=compress_args.calib_batch_size, seed=training_args.seed,
                                true_sequential=compress_args.true_sequential, factor_bits=init_args.factor_bits,
                                capture=init_args.capture, base_from=init_args.init_method, progress=progress)
    lap("compress_and_init")
    stages["compressed"] = evaluate(model)
    lap("eval_compressed")

    factors = {path: per_init[init_args.init_method] for path, per_init in sequential.factors.items()}
    config = lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, model_args.lora_target_modules)
    peft_model = build_lora_model(model, factors, config, trim_to_effective_rank=init_args.trim_rank)
    output_dir = Path(training_args.output_dir)
    if main:
        save_adapter(peft_model, output_dir / f"{init_args.init_method}_init")
    stages["compensated"] = evaluate(peft_model)
    lap("eval_compensated")

    trainer = train_adapters(peft_model, tokenizer, train_dataset, training_args)
    lap("train")
    stages["finetuned"] = evaluate(peft_model, with_ppl=task_args.ppl_after_finetune)
    lap("eval_finetuned")

    results = {
        "title": f"{task_args.task}: {compress_args.describe()} + {init_args.init_method} r{model_args.lora_r} "
                 f"on {model_args.model_name_or_path}",
        "stages": stages,
        "summary": {
            "model": model_args.model_name_or_path,
            "compression": compress_args.describe(),
            "init": f"{init_args.init_method} rank={model_args.lora_r} alpha={model_args.lora_alpha}",
            "calibration tokens": sequential.calib_tokens,
            "train items": len(train_items), "eval items": len(eval_items),
            "train steps": trainer.state.global_step,
            "trainable parameters": trainable_summary(peft_model)["trainable"],
            "world size": state.num_processes,
        },
        "timings": timings,
        "train_loss": loss_history(trainer),
        "layers": sequential.layers,
        "config": {cls.__name__: {k: v for k, v in dataclasses.asdict(obj).items() if not k.startswith("_")}
                   for cls, obj in zip((TaskArguments, CompressionArguments, AdapterInitArguments, EoraModelConfig),
                                       (task_args, compress_args, init_args, model_args))}
                  | {"SFTConfig": training_args.to_dict()},
    }
    if main:
        save_adapter(peft_model, output_dir / "adapter")
        write_results(output_dir, results)
    state.wait_for_everyone()
    return results
