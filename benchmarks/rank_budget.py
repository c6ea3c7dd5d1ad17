"""Beyond EoRA at the same adapter size: per-linear ranks (a rank budget) and EoRA alternated with the compressor.

For each compression setting: compress the bundled nano model once, factor eora and svd once at the
widest rank any allocation may give (``4 x`` the largest ``--ranks``, capped by the smallest layer),
then for every rank r: uniform r on every linear, and ``rank_allocation: budget`` with the same
adapter parameters under both normalisations (relative and absolute output error). With
``--alt-ranks``: ``eora_alt`` (2 alternations of the compressor on ``W - B A`` and EoRA; its own base)
at uniform rank r, and at the wide rank with the budget spent (the combination). Held-out Wikipedia
and WikiText-2 perplexity of each, before any training, with adapter parameters, wall time of the
pass, and the summed squared relative output error the allocation minimises. Prints JSON lines, then
a table. ``init s`` is the initializer's own time for that row (EoRA/SVD factored once at the wide
rank, plus the allocation; eora_alt's whole pass; refinement's steps on top of EoRA's), ``adapter
bytes`` the size of the ``adapter_model.safetensors`` PEFT writes for it:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rank_budget.py \
        --settings gptq/2/128 rtn/2/128 sparsegpt/2:4 --ranks 16 64 --alt-ranks 16

``--refine-steps N`` adds eora's uniform and budget adapters after N steps of the model-level
refinement (``refine_steps``, ``--refine-target final`` or ``layers``) on the calibration text.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_ppl import C4, parse_setting  # noqa: E402

from eora_ft.compress import make_compressor  # noqa: E402
from eora_ft.init.sequential import compress_model  # noqa: E402
from eora_ft.config import DEFAULT_MODEL, LLAMA_LINEARS  # noqa: E402
from eora_ft.data import calibration_tokens, resolve_path  # noqa: E402
from eora_ft.data.heldout import BUNDLED_PATHS, heldout_texts  # noqa: E402
from eora_ft.eval.scoring import perplexity  # noqa: E402
from eora_ft.init.rank_budget import allocate_ranks  # noqa: E402
from eora_ft.adapters.peft_bridge import build_lora_model, lora_config  # noqa: E402
from eora_ft.init.refine import REFINE_TARGETS, refine_adapters, teacher_hidden_states  # noqa: E402

INITS = ("eora", "svd")


def measure(model, tokenizer, texts, windows: int) -> dict:
    return {text.name: round(perplexity(model, tokenizer, content, window=512, max_windows=windows,
                                        progress=False)["ppl"], 2) for text, content in texts}


def adapter_bytes(adapted) -> int:
    """Size of the ``adapter_model.safetensors`` PEFT saves for ``adapted`` (its rank_pattern included)."""
    with tempfile.TemporaryDirectory() as directory:
        adapted.save_pretrained(directory)
        return (Path(directory) / "adapter_model.safetensors").stat().st_size


def alternated(original, modules, calib, setting: str, rank: int, wide: int, costs: dict, tokenizer, texts,
               windows: int) -> list[dict]:
    """eora_alt at uniform ``rank``, and at ``wide`` with a budget of ``rank`` on every linear spent (relative)."""
    rows = []
    for label, factor_rank in (("uniform", rank), ("budget/relative", wide)):
        options = parse_setting(setting)
        model = copy.deepcopy(original)
        start = time.perf_counter()
        result = compress_model(model, calib, make_compressor(options.pop("method"), **options), ["eora_alt"],
                                rank=factor_rank, init_options={"eora_alt": {"iters": 2}}, base_from="eora_alt",
                                target_modules=LLAMA_LINEARS, progress=False, precompressed=dict(modules))
        seconds = time.perf_counter() - start
        curves = {path: result.error_curves[path]["eora_alt"] for path in costs}
        ranks = ({path: rank for path in costs} if label == "uniform" else
                 allocate_ranks(curves, costs, rank * sum(costs.values())))
        factors = {path: result.factors[path]["eora_alt"].truncate(ranks[path]) for path in costs}
        adapted = build_lora_model(model, factors, lora_config(rank, rank, 0.0, LLAMA_LINEARS))
        rows.append({"setting": setting, "init": "eora_alt", "allocation": label, "rank": rank,
                     "params": sum(ranks[p] * costs[p] for p in costs), "seconds": round(seconds, 1),
                     "bytes": adapter_bytes(adapted), "sum_rel_err2": round(sum(curves[p][ranks[p]] ** 2 for p in costs), 4),
                     "rank_min_max": [min(ranks.values()), max(ranks.values())],
                     **measure(adapted, tokenizer, texts, windows)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def refined(adapted, calib, teacher, args, setting: str, allocation: str, rank: int, ranks: dict, costs: dict,
            tokenizer, texts, init_seconds: float) -> dict:
    """``adapted`` after ``--refine-steps`` of :func:`eora_ft.init.refine.refine_adapters` (batch 8)."""
    report = refine_adapters(adapted, calib, teacher, args.refine_steps, args.refine_learning_rate, batch_size=8)
    row = {"setting": setting, "init": f"eora+refine/{args.refine_target}", "allocation": allocation, "rank": rank,
           "params": sum(ranks[p] * costs[p] for p in costs), "bytes": adapter_bytes(adapted),
           "seconds": round(init_seconds + report["seconds"], 1),
           "refine_loss": [round(report["loss_first"], 4), round(report["loss_last"], 4)],
           "rank_min_max": [min(ranks.values()), max(ranks.values())],
           **measure(adapted, tokenizer, texts, args.windows)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["gptq/2/128"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--alt-ranks", nargs="*", type=int, default=[], help="ranks to run eora_alt at")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="also refine eora's uniform and budget adapters for this many steps (refine_steps)")
    parser.add_argument("--refine-learning-rate", type=float, default=1e-3)
    parser.add_argument("--refine-target", choices=REFINE_TARGETS, default="final")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(DEFAULT_MODEL))
    original = AutoModelForCausalLM.from_pretrained(resolve_path(DEFAULT_MODEL), dtype=torch.float32).eval()
    texts = [(t, t.read()) for t in heldout_texts(",".join([BUNDLED_PATHS["enwiki_heldout"], BUNDLED_PATHS["wikitext2"]]))]
    calib = calibration_tokens(tokenizer, resolve_path(C4), args.calib_samples, 512, seed=0)
    teacher = teacher_hidden_states(original, calib, 8, "cpu", args.refine_target) if args.refine_steps else None
    rows = [{"setting": "base", "init": "-", "allocation": "-", "rank": 0, "params": 0,
             **measure(original, tokenizer, texts, args.windows)}]
    print(json.dumps(rows[-1]), flush=True)
    for setting in args.settings:
        options = parse_setting(setting)
        model = copy.deepcopy(original)
        start = time.perf_counter()
        wide = min(4 * max(args.ranks), 128)  # nano's k/v projections are 128 wide
        result = compress_model(model, calib, make_compressor(options.pop("method"), **options), list(INITS),
                                rank=wide, target_modules=LLAMA_LINEARS, progress=False)
        seconds = time.perf_counter() - start
        rows.append({"setting": setting, "init": "none", "allocation": "-", "rank": 0, "params": 0, "bytes": 0,
                     "seconds": round(seconds - sum(result.init_seconds.values()), 1), **measure(model, tokenizer, texts, args.windows)})
        print(json.dumps(rows[-1]), flush=True)
        costs = {path: f["eora"].a.shape[1] + f["eora"].b.shape[0] for path, f in result.factors.items()}
        modules = {path: module for path, module in model.named_modules() if hasattr(module, "dequantize")}
        for rank in args.alt_ranks:
            rows += alternated(original, modules, calib, setting, rank, wide, costs, tokenizer, texts, args.windows)
        for rank in args.ranks:
            for init in INITS:
                curves = {path: result.error_curves[path][init] for path in costs}
                plans = {"uniform": ({path: rank for path in costs}, 0.0)}
                for normalisation in ("relative", "absolute"):
                    started = time.perf_counter()
                    ranks = allocate_ranks(curves, costs, rank * sum(costs.values()), energies=result.output_energies,
                                           normalisation=normalisation)
                    plans[f"budget/{normalisation}"] = (ranks, time.perf_counter() - started)
                for allocation, (ranks, allocation_seconds) in plans.items():
                    init_seconds = result.init_seconds[init] + allocation_seconds
                    factors = {path: result.factors[path][init].truncate(ranks[path]) for path in costs}
                    adapted = build_lora_model(copy.deepcopy(model), factors, lora_config(rank, rank, 0.0, LLAMA_LINEARS))
                    if args.refine_steps and init == "eora" and allocation != "budget/absolute":
                        rows.append(refined(adapted, calib, teacher, args, setting, allocation, rank, ranks, costs,
                                            tokenizer, texts, init_seconds))
                        adapted = build_lora_model(copy.deepcopy(model), factors, lora_config(rank, rank, 0.0, LLAMA_LINEARS))
                    rows.append({
                        "setting": setting, "init": init, "allocation": allocation, "rank": rank,
                        "params": sum(ranks[p] * costs[p] for p in costs), "bytes": adapter_bytes(adapted),
                        "seconds": round(init_seconds, 1), "sum_rel_err2": round(sum(curves[p][ranks[p]] ** 2 for p in costs), 4),
                        "rank_min_max": [min(ranks.values()), max(ranks.values())],
                        **measure(adapted, tokenizer, texts, args.windows)})
                    print(json.dumps(rows[-1]), flush=True)
    print("\n| setting | init | allocation | r | adapter params | adapter bytes | init s | ranks min-max | sum rel. err^2 "
          "| enwiki held-out ppl | WikiText-2 ppl |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['init']} | {row['allocation']} | {row['rank'] or '-'} | {row['params']:,} | "
              f"{row.get('bytes', 0):,} | {row.get('seconds', '-')} | "
              f"{'-'.join(map(str, row.get('rank_min_max', []))) or '-'} | {row.get('sum_rel_err2', '-')} | "
              f"{row['enwiki_heldout']:.2f} | {row['wikitext2']:.2f} |")


if __name__ == "__main__":
    main()
