"""``eora-ft eval``: evaluate a model, a compressed model, or either with a PEFT adapter, offline.

    eora-ft eval --model_name_or_path eora_ft/assets/models/nano-llama-5m --tasks arc_challenge,wikitext2 \
        --output_file results.json
    eora-ft eval --compressed_model CACHE_ENTRY/base --adapter runs/x/adapter --tasks arc_challenge,gsm8k \
        --eval_limit 50 --output_file r.json
    eora-ft eval --model_name_or_path eora_ft/assets/models/nano-llama-5m --tasks arc_challenge,my_task \
        --lm_eval_include_path my_tasks/ --lm_eval_limit 100 --output_file r.json

The scoring knobs are the recipe fields of the same names (``--eval_limit``, ``--eval_batch_size``,
``--num_fewshot``, ``--max_new_tokens``, ``--ppl_window``, ``--ppl_max_windows``, ``--dtype``). Task data
defaults to the bundled files (``--data arc_challenge=path`` overrides, hub ids work where the hub is
reachable). Metrics follow lm-evaluation-harness 0.4 (see eora_ft/eval/tasks.py).

Any other name in ``--tasks`` is an lm-evaluation-harness task (``pip install -e ".[eval]"``): lm-eval itself
runs it on the loaded model (:mod:`eora_ft.eval.harness`), with the recipe fields ``--lm_eval_num_fewshot``,
``--lm_eval_limit`` and ``--lm_eval_include_path`` (a directory of your own task YAMLs); its metrics
(``lm_eval/<task>/<metric>``) go into the same table and results file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eora_ft.config import EoraModelConfig, TaskArguments
from eora_ft.data.heldout import BUNDLED_PATHS, heldout_texts
from eora_ft.eval.harness import check_lm_eval_tasks, harness_evaluate, harness_table_metrics
from eora_ft.eval.tasks import TASKS, get_task

from .arguments import LegacyFlag, LegacyFlags, dashed, fields_of, parse_command

ASSET_DATA = Path(__file__).resolve().parents[1] / "assets" / "data"
EXTRA_TASKS = tuple(BUNDLED_PATHS)  # perplexity texts: enwiki_heldout, c4_heldout, wikitext2
# your own data is scored inside its recipe, tokenized as it was trained (max_length, chat template)
RECIPE_ONLY = tuple(name for name, task in TASKS.items() if task.tokenize is not None)
TASK_FIELDS = ["eval_limit", "eval_batch_size", "num_fewshot", "max_new_tokens", "ppl_window", "ppl_max_windows",
               "lm_eval_num_fewshot", "lm_eval_limit", "lm_eval_include_path"]
MODEL_FIELDS = ["model_name_or_path", "dtype"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class EvalTargets:
    """What only ``eora-ft eval`` has: what to load, which tasks, where the results go."""

    tasks: str = field(metadata={"help": f"Comma-separated: ours, {sorted(set(TASKS) - set(RECIPE_ONLY)) + list(EXTRA_TASKS)}, and any "
                                         "lm-evaluation-harness task (mmlu, hellaswag, ...; pip install -e '.[eval]'), "
                                         "which lm-eval runs on the loaded model."})
    output_file: str = field(metadata={"help": "results.json to write (atomically)."})
    compressed_model: str | None = field(
        default=None, metadata={"help": "A compressed checkpoint to evaluate instead of model_name_or_path: eora_ft's "
                                        "(e.g. a cache entry's base/), GPTQ, or compressed-tensors pack-quantized "
                                        "(llm-compressor); the format is detected. Its own tokenizer is used when it "
                                        "has one, else that of the model it records as its original, else "
                                        "model_name_or_path's (refused when it has more tokens than the model)."})
    adapter: str | None = field(default=None, metadata={"help": "A PEFT adapter directory to apply on top."})
    data: list[str] = field(default_factory=list, metadata={
        "help": "TASK=PATH evaluation data per task (default: the bundled file)."})
    fewshot_data: list[str] = field(default_factory=list, metadata={
        "help": "TASK=PATH few-shot pool for generation tasks (default: the bundled training file)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when there is one, else cpu), cpu, cuda, cuda:N."})


LEGACY = LegacyFlags("eval", {
    "--model": LegacyFlag("--model_name_or_path"), "--compressed": LegacyFlag("--compressed_model"),
    "--limit": LegacyFlag("--eval_limit"), "--batch-size": LegacyFlag("--eval_batch_size"),
    "--data": LegacyFlag("--data", merge=True), "--fewshot-data": LegacyFlag("--fewshot_data", merge=True),
    "--output": LegacyFlag("--output_file"),
    **dashed("num_fewshot", "max_new_tokens", "ppl_window", "ppl_max_windows"),
})


# what the parser reads: recipe fields (copied, not re-declared) and this command's own
DATACLASSES = (fields_of(TaskArguments, TASK_FIELDS), fields_of(EoraModelConfig, MODEL_FIELDS), EvalTargets)


def parse(argv: list[str]) -> tuple[TaskArguments, EoraModelConfig, EvalTargets]:
    """``argv`` -> the validated recipe dataclasses (scoring knobs, model) and the targets."""
    scoring, model, targets = parse_command(
        "eora-ft eval", DATACLASSES,
        argv, LEGACY, description="Evaluate a model / compressed model / adapter on tasks.")
    return TaskArguments(**asdict(scoring)), EoraModelConfig(**asdict(model)), targets


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        if "=" not in value:
            raise SystemExit(f"{flag} {value!r}: expected TASK=PATH")
        task, path = value.split("=", 1)
        out[task] = path
    return out


def _load(model_args: EoraModelConfig, targets: EvalTargets, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eora_ft.adapters.peft_bridge import load_adapter
    from eora_ft.compress.formats import import_model

    from eora_ft.utils.dtypes import model_dtype

    dtype = model_dtype(model_args.dtype, targets.compressed_model or model_args.model_name_or_path, device)
    if targets.compressed_model:  # small: read straight onto the device
        model = import_model(targets.compressed_model, dtype=dtype, device=device)
        own = any((Path(targets.compressed_model) / name).is_file() for name in TOKENIZER_FILES)
        # without its own tokenizer: the model it was compressed from (eora_ft records it), else model_name_or_path
        recorded = (getattr(model, "compression_config", None) or {}).get("model")
        source = targets.compressed_model if own else (recorded or model_args.model_name_or_path)
    else:  # on the CPU; evaluation moves it to the device if it fits there, else streams its layers
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype)
        source = model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:  # a token id past the embedding: scoring would index out of range
        raise SystemExit(f"the tokenizer of {source!r} has {len(tokenizer)} tokens but the model has vocab_size={vocab}: "
                         "it is not this model's tokenizer; pass --model_name_or_path the model it was compressed from")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if targets.adapter:
        model = load_adapter(model, targets.adapter)
    return model.eval(), tokenizer


def eval_command(argv: list[str]) -> int:
    """Parse, check every name and path, load, evaluate each task, write results.json atomically."""
    from eora_ft.run.inputs import check_sources
    from eora_ft.utils.atomic import atomic_write_text
    from eora_ft.utils.model_checks import check_positions
    from eora_ft.utils.placement import placed_for_inference

    scoring, model_args, targets = parse(argv)
    names = list(dict.fromkeys(t.strip() for t in targets.tasks.split(",") if t.strip()))
    ours = sorted(set(TASKS) - set(RECIPE_ONLY)) + list(EXTRA_TASKS)
    if set(names) & set(RECIPE_ONLY):
        raise SystemExit(f"--tasks {targets.tasks!r}: {sorted(set(names) & set(RECIPE_ONLY))} scores your own data "
                         "as it was trained; run recipes/sft.py (its results table has the eval loss per stage)")
    if not names:
        raise SystemExit(f"--tasks {targets.tasks!r} names no task; ours: {ours}, or any lm-evaluation-harness task")
    harness = [n for n in names if n not in ours]  # ours keep our fast path, lm-eval runs the others
    try:  # lm-eval installed, every other name its task: before the model loads
        check_lm_eval_tasks(",".join(harness), scoring.lm_eval_include_path, load=False, what=f"--tasks {targets.tasks!r}")
    except ImportError as error:
        raise SystemExit(f"--tasks {targets.tasks!r}: {harness} are not ours ({ours}); as lm-evaluation-harness "
                         f"tasks: {error}") from None
    except ValueError as error:
        raise SystemExit(f"{error}. Ours: {ours}") from None
    data, pools = _pairs(targets.data, "--data"), _pairs(targets.fewshot_data, "--fewshot_data")
    for task, path in {**data, **pools}.items():
        if task not in names:
            raise SystemExit(f"--data/--fewshot_data names task {task!r}, which is not in --tasks {names}")
        if task in harness:
            raise SystemExit(f"--data/--fewshot_data names lm-eval task {task!r}: its YAML says where its data is "
                             "(dataset_path: json with data_files for local files), in --lm_eval_include_path")
    check_sources([(path, f"--data {task}", "text" if task in BUNDLED_PATHS else get_task(task).schema)
                   for task, path in {**data, **pools}.items()])  # every file checked before the model loads
    output = Path(targets.output_file)
    if output.is_dir():
        raise SystemExit(f"--output_file {targets.output_file!r} is a directory; give a file name such as results.json")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if targets.device == "auto" else targets.device
    model, tokenizer = _load(model_args, targets, device)
    if any(name in BUNDLED_PATHS for name in names):
        check_positions(model.config, {"ppl_window": scoring.ppl_window})
    metrics, columns, timings = {}, [], {}
    with placed_for_inference(model, device):
        _evaluate_all(model, tokenizer, [n for n in names if n not in harness], data, pools, scoring, metrics,
                      columns, timings)
        if harness:
            start = time.perf_counter()
            found = harness_evaluate(model, tokenizer, harness, num_fewshot=scoring.lm_eval_num_fewshot,
                                     limit=scoring.lm_eval_limit, batch_size=scoring.eval_batch_size,
                                     include_path=scoring.lm_eval_include_path)
            metrics.update(found)
            columns += [list(row) for row in harness_table_metrics(found)]
            timings["lm_eval"] = time.perf_counter() - start
    results = {"model": None if targets.compressed_model else model_args.model_name_or_path,
               "tokenizer": tokenizer.name_or_path,
               "compressed": targets.compressed_model, "adapter": targets.adapter, "limit": scoring.eval_limit,
               "metrics": metrics, "columns": columns, "timings": timings}
    if harness:
        from importlib.metadata import version

        results["lm_eval"] = {"tasks": harness, "num_fewshot": scoring.lm_eval_num_fewshot,
                              "limit": scoring.lm_eval_limit, "include_path": scoring.lm_eval_include_path,
                              "version": version("lm_eval")}
    atomic_write_text(output, json.dumps(results, indent=2) + "\n")
    print("| metric | value |\n|---|---|")
    for key, label, kind in columns:
        value = metrics[key]
        print(f"| {label} | {100 * value:.2f} |" if kind == "pct" else f"| {label} | {value:.2f} |")
    print(f"wrote {output}")
    return 0


def _evaluate_all(model, tokenizer, names: list[str], data: dict, pools: dict, scoring: TaskArguments,
                  metrics: dict, columns: list, timings: dict) -> None:
    from eora_ft.eval.scoring import perplexity

    for name in names:
        start = time.perf_counter()
        if name in BUNDLED_PATHS:
            (text,) = heldout_texts(BUNDLED_PATHS[name])
            key, label, kind = text.metric
            metrics[key] = perplexity(model, tokenizer, heldout_texts(data.get(name, text.path))[0].read(),
                                      window=scoring.ppl_window, max_windows=scoring.ppl_max_windows, desc=name)["ppl"]
            columns.append([key, label, kind])
        else:
            task = get_task(name)
            items = task.load(data.get(name, str(ASSET_DATA / task.bundled_eval)), split="test", limit=scoring.eval_limit)
            pool = []
            if name == "gsm8k":
                pool = task.load(pools.get(name, str(ASSET_DATA / task.bundled_train)), split="train")
            metrics.update(task.evaluate(model, tokenizer, items, pool, batch_size=scoring.eval_batch_size,
                                         max_new_tokens=scoring.max_new_tokens, num_fewshot=scoring.num_fewshot))
            columns += [list(m) for m in task.metrics]
        timings[name] = time.perf_counter() - start
