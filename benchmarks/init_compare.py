"""How much of the compression loss each adapter initialisation recovers, before any training.

For every compression setting and calibration size: WikiText-2 perplexity of the compressed model and
of the model with `eora`, `act_diag` and `svd` factors at several ranks (the factors of one SVD
truncated, which is exact for all three), ARC-Challenge dev accuracy at one rank, each
initializer's wall time, and covariance shrinkage (0 = EoRA ... 1 = SVD) chosen on held-out C4
tokens. Prints one JSON object per line, then markdown tables:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/init_compare.py \
        --settings gptq/3/-1 gptq/2/128 rtn/2/128 sparsegpt/2:4 gptq+sparsegpt/4/128/2:4 --calib-samples 16 64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_ppl import C4, WIKITEXT, parse_setting  # noqa: E402

from eora_ft.compress import make_compressor  # noqa: E402
from eora_ft.init.sequential import compress_model  # noqa: E402
from eora_ft.config import DEFAULT_MODEL, LLAMA_LINEARS  # noqa: E402
from eora_ft.data import calibration_tokens, load_arc, read_text, resolve_path  # noqa: E402
from eora_ft.eval.scoring import perplexity, score_multiple_choice  # noqa: E402
from eora_ft.init import LowRankFactors, eora_factors  # noqa: E402
from eora_ft.adapters.peft_bridge import build_lora_model, load_factors, lora_config  # noqa: E402

ARC_DEV = "eora_ft/assets/data/arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"
SHRINKS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def padded(factors: LowRankFactors, rank: int, slots: int) -> LowRankFactors:
    """Leading ``rank`` directions in a ``slots``-wide adapter (zero rows/columns contribute nothing)."""
    a = torch.zeros(slots, factors.a.shape[1])
    b = torch.zeros(factors.b.shape[0], slots)
    a[:rank], b[:, :rank] = factors.a[:rank], factors.b[:, :rank]
    return LowRankFactors(a, b, min(rank, factors.effective_rank))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--settings", nargs="+", default=["gptq/3/-1", "gptq/2/128", "rtn/2/128", "sparsegpt/2:4",
                                                          "gptq+sparsegpt/4/128/2:4"])
    parser.add_argument("--inits", nargs="+", default=["eora", "act_diag", "svd"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--calib-samples", nargs="+", type=int, default=[16, 64], help="x seq-len tokens each")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--arc-rank", type=int, default=16)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--heldout-windows", type=int, default=8, help="C4 windows (seed 1) for choosing shrink")
    args = parser.parse_args()

    path = resolve_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    wikitext = read_text(resolve_path(WIKITEXT))
    arc = load_arc(resolve_path(ARC_DEV))
    heldout = calibration_tokens(tokenizer, resolve_path(C4), args.heldout_windows, args.seq_len, seed=1)
    heldout_text_ids = heldout  # [W, L]: perplexity over these windows directly
    slots = max(args.ranks)

    def ppl(model) -> float:
        return perplexity(model, tokenizer, wikitext, window=512, max_windows=args.ppl_windows, progress=False)["ppl"]

    @torch.no_grad()
    def heldout_ppl(model) -> float:
        losses = [model(input_ids=heldout_text_ids[i:i + 4], labels=heldout_text_ids[i:i + 4]).loss.item()
                  for i in range(0, heldout_text_ids.shape[0], 4)]
        return math.exp(sum(losses) / len(losses))

    def acc(model) -> float:
        return score_multiple_choice(model, tokenizer, arc, progress=False)["acc"]

    base_ppl, base_acc = ppl(base), acc(base)
    print(json.dumps({"setting": "uncompressed", "ppl": base_ppl, "arc_acc": base_acc}), flush=True)
    rows = []
    for samples in args.calib_samples:
        calib = calibration_tokens(tokenizer, resolve_path(C4), samples, args.seq_len, seed=0)
        for setting in args.settings:
            model = copy.deepcopy(base)
            result = compress_model(model, calib, make_compressor(**parse_setting(setting)), args.inits, rank=slots,
                                    target_modules=LLAMA_LINEARS, keep_stats=True, progress=False)
            row = {"setting": setting, "calib_tokens": result.calib_tokens, "ppl/none": ppl(model), "acc/none": acc(model),
                   "compress_seconds": round(result.seconds - sum(result.init_seconds.values()), 2)}
            row.update({f"init_seconds/{k}": round(v, 3) for k, v in result.init_seconds.items()})
            peft_model = build_lora_model(model, None, lora_config(slots, slots, 0.0, LLAMA_LINEARS))
            for init in args.inits:
                for rank in args.ranks:
                    load_factors(peft_model, {p: padded(f[init], rank, slots) for p, f in result.factors.items()})
                    row[f"ppl/{init}/r{rank}"] = ppl(peft_model)
                    if rank == args.arc_rank:
                        row[f"acc/{init}/r{rank}"] = acc(peft_model)
            # shrinkage chosen on held-out C4 windows at the ARC rank, then scored on WikiText-2
            chosen, best = None, float("inf")
            for shrink in SHRINKS:
                factors = {p: padded(eora_factors(result.deltas[p], result.stats[p], args.arc_rank, shrink=shrink),
                                     args.arc_rank, slots) for p in result.factors}
                load_factors(peft_model, factors)
                score = heldout_ppl(peft_model)
                row[f"heldout_ppl/shrink{shrink:g}"] = score
                if score < best:
                    chosen, best, chosen_factors = shrink, score, factors
            load_factors(peft_model, chosen_factors)
            row["shrink/chosen"] = chosen
            row[f"ppl/shrink_chosen/r{args.arc_rank}"] = ppl(peft_model)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nuncompressed: WikiText-2 ppl {base_ppl:.2f}, ARC-C acc {100 * base_acc:.2f}\n")
    header = ["setting", "calib tokens", "none", *[f"{i} r{r}" for i in args.inits for r in args.ranks]]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        cells = [row["setting"], str(row["calib_tokens"]), f"{row['ppl/none']:.2f}"]
        cells += [f"{row[f'ppl/{i}/r{r}']:.2f}" for i in args.inits for r in args.ranks]
        print("| " + " | ".join(cells) + " |")
    header = ["setting", "calib tokens", "ARC none", *[f"ARC {i} r{args.arc_rank}" for i in args.inits],
              "shrink chosen", f"ppl shrink-chosen r{args.arc_rank}", f"ppl eora r{args.arc_rank}", f"ppl svd r{args.arc_rank}",
              *[f"{i} s" for i in args.inits]]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        cells = [row["setting"], str(row["calib_tokens"]), f"{100 * row['acc/none']:.2f}"]
        cells += [f"{100 * row[f'acc/{i}/r{args.arc_rank}']:.2f}" for i in args.inits]
        cells += [f"{row['shrink/chosen']:g}", f"{row[f'ppl/shrink_chosen/r{args.arc_rank}']:.2f}",
                  f"{row.get(f'ppl/eora/r{args.arc_rank}', float('nan')):.2f}", f"{row.get(f'ppl/svd/r{args.arc_rank}', float('nan')):.2f}"]
        cells += [f"{row.get(f'init_seconds/{i}', 0):.2f}" for i in args.inits]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
