"""From a trained adapter (or a run directory) to a merged checkpoint beside a report of what it kept.

Shared by ``eora-ft merge`` and a recipe's ``merge: true``. Writes ``output_dir/model/`` (the merged base),
``output_dir/residual_adapter/`` (with a residual rank; it names ``model/``) and ``merge_report.md``/``.json``,
all in one atomic directory swap: a crash leaves the previous output or the new one, never a part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from eora_ft.adapters.peft_bridge import _compressed_snapshot, build_lora_model, load_pretrained, lora_config, save_adapter
from eora_ft.compress.formats import WRITERS, detect_format
from eora_ft.config import CompressionArguments, TaskArguments
from eora_ft.data import mixed_calibration, resolve_path
from eora_ft.data.heldout import heldout_texts
from eora_ft.data.task_text import task_texts
from eora_ft.eval.scoring import perplexity
from eora_ft.eval.tasks import get_task
from eora_ft.run.inputs import check_output_dir, check_sources, load_run_items
from eora_ft.run.merge import merge_adapter
from eora_ft.run.merge_report import BARE, REFERENCE, write_merge_report
from eora_ft.utils.atomic import atomic_directory
from eora_ft.utils.dtypes import model_dtype
from eora_ft.utils.placement import default_device, placed_for_inference

logger = logging.getLogger("eora_ft")

RUN_RESULTS = "results.json"
MERGE_REPORT = "merge_report.json"


def locate(adapter: str | Path) -> tuple[Path, dict | None]:
    """``(adapter directory, the run's results.json or None)`` for an adapter directory or a run directory."""
    path = Path(adapter).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"adapter={str(adapter)!r} is neither a PEFT adapter directory (adapter_config.json) nor a "
                         "run directory holding adapter/")
    results = path.parent / RUN_RESULTS
    run = json.loads(results.read_text()) if results.is_file() else None
    return path, run if run and "config" in run else None


def recorded_compression(model: torch.nn.Module, run: dict | None) -> dict:
    """How the base was compressed: its own ``compression_config``, else the run's recorded compression settings,
    else nothing (another tool's checkpoint: the merge reads bits, groups, symmetry and masks off the layers)."""
    meta = getattr(model, "compression_config", None) or {}
    if meta.get("method"):
        return meta
    if run is not None:
        config = run["config"]["CompressionArguments"]
        return {"method": config["compress_method"], "options": config}
    return {}


def run_scorer(run: dict | None, tokenizer, progress: bool = True):
    """``(score(model) -> metrics, metric columns)``: the run's task (multiple choice and generation tasks; their
    eval loss included) and held-out texts as the run scored them, or the default held-out texts without a run."""
    names = {f.name for f in dataclasses.fields(TaskArguments)}
    task_args = TaskArguments(**{k: v for k, v in (run["config"]["TaskArguments"] if run else {}).items() if k in names})
    texts = [(text, text.read()) for text in heldout_texts(task_args.ppl_dataset)]
    task = get_task(task_args.task) if run else None
    items = pool = ()
    if task is not None and task.tokenize is None and task.metrics:
        loaded = load_run_items(task, task_args)
        pool, items = loaded.train, loaded.evaluation
    columns = ([list(m) for m in task.metrics] if items else []) + [list(text.metric) for text, _ in texts]

    def score(model) -> dict:
        metrics = {}
        if items:
            metrics |= task.evaluate(model, tokenizer, items, pool, batch_size=task_args.eval_batch_size,
                                     progress=progress, max_new_tokens=task_args.max_new_tokens,
                                     num_fewshot=task_args.num_fewshot)
        for text, content in texts:
            metrics[text.metric[0]] = perplexity(model, tokenizer, content, window=task_args.ppl_window,
                                                 max_windows=task_args.ppl_max_windows, progress=progress,
                                                 desc=text.name)["ppl"]
        return metrics

    return score, columns


def merge_calibration(tokenizer, options: CompressionArguments) -> torch.Tensor:
    """The merge's calibration tokens int64 ``[calib_num_samples, calib_seq_len]`` (the recipes' calibration
    fields: generic text, with ``calib_task_fraction`` of ``calib_task_dataset`` mixed in)."""
    task_text = (task_texts(options.calib_task_format, resolve_path(options.calib_task_dataset))
                 if options.calib_task_dataset else [])
    return mixed_calibration(tokenizer, options.calib_dataset, task_text, options.calib_num_samples,
                             options.calib_seq_len, task_fraction=options.calib_task_fraction if task_text else 0.0,
                             seed=options.calib_seed)


def merge_directory(adapter: str | Path, output_dir: str | Path, options: CompressionArguments,
                    evaluate: bool = True, dtype: str = "auto", progress: bool = True,
                    scored: dict[str, dict] | None = None) -> dict:
    """Merge the adapter at ``adapter`` (or a run directory's) into its compressed base and write ``output_dir``;
    returns the report (``stages``: metrics of the bare base, base + adapter and each merge). Everything that can
    be checked is checked before the model loads. ``scored``: stages already measured the same way (a recipe's
    ``compressed`` and ``finetuned`` rows, under :data:`BARE` and :data:`REFERENCE`), not measured again."""
    adapter_dir, run = locate(adapter)
    check_output_dir(output_dir, "output_dir")
    output = Path(output_dir).resolve()
    if output == adapter_dir.resolve() or adapter_dir.resolve() in output.parents:
        raise ValueError(f"output_dir={str(output_dir)!r} lies inside the adapter it merges; write it elsewhere "
                         "(e.g. beside it: <run>/merged)")
    check_sources([(part, "calib_dataset", "text") for part in options.calib_dataset.split(",")]
                  + [(options.calib_task_dataset, "calib_task_dataset", options.calib_task_format)])
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_name = adapter_config["base_model_name_or_path"]
    local_base = _compressed_snapshot(base_name, adapter_config.get("revision")) or base_name
    try:
        base_format = detect_format(local_base)
    except (ValueError, OSError) as err:  # an adapter on a plain model has nothing to merge into: said here
        raise ValueError(f"the adapter's base {base_name!r} is not a compressed checkpoint ({err}); an adapter over "
                         "an uncompressed model merges with PEFT's merge_and_unload()") from None
    merge_format = base_format if options.merge_format == "auto" else options.merge_format
    execution, activations = options.placement(default_device())
    model = load_pretrained(adapter_dir, dtype=model_dtype(dtype, local_base, execution))  # on the CPU
    if merge_format == "compressed-tensors":  # the merged layers keep their storage: what would fail later fails now
        from eora_ft.compress.ct_format import unrepresentable

        reason = unrepresentable(model.get_base_model())
        if reason:
            raise ValueError(f"merge_format='compressed-tensors' cannot hold this base ({reason}); use merge_format "
                             "eora_ft (or gptq for integer grids)")
    tokenizer = AutoTokenizer.from_pretrained(
        str(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else local_base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    recorded = recorded_compression(model.get_base_model(), run)
    score, columns = run_scorer(run, tokenizer, progress) if evaluate else (None, [])
    how, rank = options.merge_method, options.merge_residual_rank
    calib = merge_calibration(tokenizer, options)
    stages, timings = {name: metrics for name, metrics in (scored or {}).items() if metrics}, {}

    def measure(name: str, stage_model) -> None:
        if score is not None and name not in stages:
            start = time.perf_counter()
            with placed_for_inference(stage_model, execution):
                stages[name] = score(stage_model)
            timings[f"eval {name}"] = round(time.perf_counter() - start, 2)

    with model.disable_adapter():
        measure(BARE, model)
    measure(REFERENCE, model)
    merged = merge_adapter(model, calib, how=how, residual_rank=rank, recorded=recorded,
                           batch_size=options.calib_batch_size, progress=progress, execution_device=execution,
                           activations_device=activations)
    timings["merge"] = round(merged.seconds, 2)
    label = f"merged ({how})"
    measure(label, merged.model)
    summary = {"adapter": str(adapter_dir.resolve()), "base": base_name, "merge method": how,
               "merged linears": len(merged.merged), "format": merge_format,
               "calibration tokens": int(calib.numel()) if how == "recompress" or rank else 0,
               "compression (recorded)": recorded.get("description") or recorded.get("method") or "not recorded"}
    with atomic_directory(output, lambda d: (d / MERGE_REPORT).exists(), "merge output directory") as tmp:
        WRITERS[merge_format](merged.model, tmp / "model", tokenizer=tokenizer,
                              compression_config={**recorded, "merged_adapter": str(adapter_dir.resolve()),
                                                  "merge_method": how})
        if rank:
            config = lora_config(rank, rank, 0.0, sorted({p.rsplit(".", 1)[-1] for p in merged.residual}))
            residual = build_lora_model(merged.model, merged.residual, config)
            measure(f"{label} + residual r{rank}", residual)
            save_adapter(residual, tmp / "residual_adapter", str(output / "model"))
            summary["residual adapter"] = f"EoRA rank {rank} of W' - Q(W'), names {output / 'model'}"
        report = {"adapter": str(adapter_dir), "metrics": columns, "stages": stages, "summary": summary,
                  "timings": timings, "layers": merged.layers}
        write_merge_report(tmp, report)
    return report
