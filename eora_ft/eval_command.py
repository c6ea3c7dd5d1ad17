"""``eora-ft eval``: evaluate a model, a compressed model, or either with a PEFT adapter, offline.

    eora-ft eval --model eora_ft/assets/models/nano-llama-5m --tasks arc_challenge,wikitext2 --output results.json
    eora-ft eval --compressed CACHE_ENTRY/base --adapter runs/x/adapter --tasks arc_challenge,gsm8k --limit 50 --output r.json

Task data defaults to the bundled files (``--data arc_challenge=path`` overrides, hub ids work
where the hub is reachable). Metrics follow lm-evaluation-harness 0.4 (see eora_ft/tasks.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eora_ft.data.heldout import BUNDLED_PATHS, heldout_texts
from eora_ft.tasks import TASKS, get_task

ASSET_DATA = Path(__file__).resolve().parent / "assets" / "data"
EXTRA_TASKS = tuple(BUNDLED_PATHS)  # perplexity texts: enwiki_heldout, c4_heldout, wikitext2


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local directory of the (uncompressed) model; with --compressed, "
                                        "only its tokenizer is used (default: the compressed directory's)")
    parser.add_argument("--compressed", help="a compressed checkpoint: eora_ft's (e.g. a cache entry's base/), GPTQ, or "
                                             "compressed-tensors pack-quantized (llm-compressor); the format is detected")
    parser.add_argument("--adapter", help="a PEFT adapter directory to apply on top")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated, from {sorted(TASKS) + list(EXTRA_TASKS)}")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                        help="evaluation data for a task (default: the bundled file); repeatable")
    parser.add_argument("--fewshot-data", action="append", default=[], metavar="TASK=PATH",
                        help="few-shot pool for generation tasks (default: the bundled training file)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--ppl-window", type=int, default=512)
    parser.add_argument("--ppl-max-windows", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", required=True, help="results.json to write")


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        if "=" not in value:
            raise SystemExit(f"{flag} {value!r}: expected TASK=PATH")
        task, path = value.split("=", 1)
        out[task] = path
    return out


def _load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eora_ft.compress.formats import import_model
    from eora_ft.peft_bridge import load_adapter

    dtype = getattr(torch, args.dtype)
    if args.compressed:  # small: read straight onto the device
        model = import_model(args.compressed, dtype=dtype, device=args.device)
        tokenizer = AutoTokenizer.from_pretrained(args.model or args.compressed)
    else:  # on the CPU; evaluation moves it to the device if it fits there, else streams its layers
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.adapter:
        model = load_adapter(model, args.adapter)
    return model.eval(), tokenizer


def eval_command(args: argparse.Namespace) -> int:
    from eora_ft.placement import placed_for_inference
    from eora_ft.atomic import atomic_write_text

    if not args.model and not args.compressed:
        raise SystemExit("give --model (a hub id or local directory) or --compressed (a save_compressed directory)")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS and n not in EXTRA_TASKS]
    if unknown or not names:
        raise SystemExit(f"--tasks {args.tasks!r}: unknown {unknown}; valid: {sorted(TASKS) + list(EXTRA_TASKS)}")
    data, pools = _pairs(args.data, "--data"), _pairs(args.fewshot_data, "--fewshot-data")
    for task, path in {**data, **pools}.items():
        if task not in names:
            raise SystemExit(f"--data/--fewshot-data names task {task!r}, which is not in --tasks {names}")
    output = Path(args.output)
    if output.is_dir():
        raise SystemExit(f"--output {args.output!r} is a directory; give a file name such as results.json")
    model, tokenizer = _load(args)
    metrics, columns, timings = {}, [], {}
    with placed_for_inference(model, args.device):
        _evaluate_all(model, tokenizer, names, data, pools, args, metrics, columns, timings)
    results = {"model": args.model, "compressed": args.compressed, "adapter": args.adapter, "limit": args.limit,
               "metrics": metrics, "columns": columns, "timings": timings}
    atomic_write_text(output, json.dumps(results, indent=2) + "\n")
    print("| metric | value |\n|---|---|")
    for key, label, kind in columns:
        value = metrics[key]
        print(f"| {label} | {100 * value:.2f} |" if kind == "pct" else f"| {label} | {value:.2f} |")
    print(f"wrote {output}")
    return 0


def _evaluate_all(model, tokenizer, names: list[str], data: dict, pools: dict, args: argparse.Namespace,
                  metrics: dict, columns: list, timings: dict) -> None:
    from eora_ft.evaluate import perplexity

    for name in names:
        start = time.perf_counter()
        if name in BUNDLED_PATHS:
            (text,) = heldout_texts(BUNDLED_PATHS[name])
            key, label, kind = text.metric
            metrics[key] = perplexity(model, tokenizer, heldout_texts(data.get(name, text.path))[0].read(),
                                      window=args.ppl_window, max_windows=args.ppl_max_windows, desc=name)["ppl"]
            columns.append([key, label, kind])
        else:
            task = get_task(name)
            items = task.load(data.get(name, str(ASSET_DATA / task.bundled_eval)), split="test", limit=args.limit)
            pool = []
            if name == "gsm8k":
                pool = task.load(pools.get(name, str(ASSET_DATA / task.bundled_train)), split="train")
            metrics.update(task.evaluate(model, tokenizer, items, pool, batch_size=args.batch_size,
                                         max_new_tokens=args.max_new_tokens, num_fewshot=args.num_fewshot))
            columns += [list(m) for m in task.metrics]
        timings[name] = time.perf_counter() - start
