"""Held-out perplexity (in-domain Wikipedia and WikiText-2) and wall time of compressors (x optional EoRA/SVD compensation) on a model.

Prints one JSON object per line (machine-readable) and a markdown table at the end:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/compress_ppl.py \
        --settings rtn/2/128 gptq/2/128 gptq/3/-1 sparsegpt/2:4 gptq+sparsegpt/4/128/2:4 nf4 --inits eora svd

A setting is ``method[/bits[/group_size]][/n:m or ratio][/act or /noact][/sym][/mse][/damp=F][/noseq]``; ``noseq``
collects every linear's statistics of a layer in one pass (no true-sequential). Each starts from a fresh copy of
the model.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eora_ft.compress import make_compressor
from eora_ft.init.sequential import compress_model
from eora_ft.config import DEFAULT_MODEL, LLAMA_LINEARS
from eora_ft.data import calibration_tokens, read_text, resolve_path
from eora_ft.eval.scoring import perplexity
from eora_ft.adapters.peft_bridge import build_lora_model, lora_config

WIKITEXT = "eora_ft/assets/data/wikitext2/wikitext-2-raw-v1.test.joined.txt"
C4 = "eora_ft/assets/data/c4/c4_en_train_calib900.jsonl"
# Text of the model's own kind that it never saw (in domain), and WikiText-2 (out of domain for the nano model).
PPL_TEXTS = {"enwiki_heldout": "eora_ft/assets/data/enwiki_heldout/wiki_49.txt", "wikitext2": WIKITEXT}


def parse_setting(setting: str) -> dict:
    """``gptq/3/-1/noact`` -> ``{"method": "gptq", "bits": 3, "group_size": -1, "act_order": False}``; also ``act``,
    ``sym``, ``mse`` (grid_search) and ``damp=0.05``; what is not named keeps the compressor's default. The
    driver's ``noseq`` token is not a compressor option (:func:`true_sequential_of`)."""
    method, *rest = [token for token in setting.split("/") if token != "noseq"]
    options: dict = {"method": method}
    numbers = [token for token in rest if token.lstrip("-").isdigit()]
    if numbers:
        options["bits"] = int(numbers[0])
    if len(numbers) > 1:
        options["group_size"] = int(numbers[1])
    flags = {"act": ("act_order", True), "noact": ("act_order", False), "sym": ("sym", True),
             "mse": ("grid_search", True)}
    for token in rest:
        if token.startswith("damp="):
            options["damp_percent"] = float(token.split("=", 1)[1])
        elif ":" in token or "." in token:
            options["sparsity"] = token
        elif token in flags:
            key, value = flags[token]
            options[key] = value
    return options


def true_sequential_of(setting: str) -> bool:
    """False when ``setting`` carries ``/noseq``: one statistics pass per layer instead of one per stage."""
    return "noseq" not in setting.split("/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--settings", nargs="+", default=["rtn/2/128", "gptq/2/128"])
    parser.add_argument("--inits", nargs="*", default=["eora", "svd"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--calib-seed", type=int, default=0, help="which calibration windows (noise level of a change)")
    parser.add_argument("--ppl-windows", type=int, default=40)
    args = parser.parse_args()

    path = resolve_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = {name: read_text(resolve_path(path)) for name, path in PPL_TEXTS.items()}
    calib = calibration_tokens(tokenizer, resolve_path(C4), args.calib_samples, args.calib_seq_len, seed=args.calib_seed)

    def ppl(model, suffix: str = "") -> dict:
        return {f"{name}{suffix}": perplexity(model, tokenizer, text, window=512, max_windows=args.ppl_windows,
                                              progress=False)["ppl"] for name, text in texts.items()}

    rows = [{"setting": "uncompressed", **ppl(base), "seconds": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for setting in args.settings:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        result = compress_model(model, calib, make_compressor(**parse_setting(setting)), args.inits,
                                rank=args.rank, target_modules=LLAMA_LINEARS, progress=False,
                                true_sequential=true_sequential_of(setting))
        seconds = time.perf_counter() - start
        row = {"setting": setting, **ppl(model), "seconds": seconds, "calib_tokens": result.calib_tokens}
        for init in args.inits:
            factors = {p: f[init] for p, f in result.factors.items()}
            peft_model = build_lora_model(copy.deepcopy(model), factors, lora_config(args.rank, args.rank, 0.0, LLAMA_LINEARS))
            row.update(ppl(peft_model, f"+{init}"))
        rows.append(row)
        print(json.dumps(row), flush=True)

    columns = ["setting", *[f"{name}{suffix}" for suffix in ["", *[f"+{i}" for i in args.inits]] for name in texts],
               "seconds"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    main()
