"""What merging a trained adapter into its compressed base keeps (issue #37), per compression setting.

For each setting and seed it trains an adapter with a recipe (``eora-ft <recipe>``, one process, global batch
16 as the demo; skipped when the run folder already holds results.json), then from the same run folder:

- ``base + adapter``: the reference (the unmerged model), and ``compressed``: the bare base;
- ``round``: the naive merge, ``W'`` rounded onto the base's grid, no data;
- ``regrid``: ``W'`` re-compressed by the base's compressor (fresh grids) on the adapted model's activations;
- ``recompress``: GPTQ onto the base's own grid (and mask) on those activations;
- ``recompress + residual r8 / r16``: plus EoRA of ``W' - Q(W')`` (r8 is the top 8 of the rank-16 factors).

Each merge starts from a fresh load of the adapter; every row is scored by the run's own scorer (its task's
accuracy and eval loss, held-out perplexities) and by its mean per-token KL divergence from the unmerged model on
the first 8 x 512 held-out Wikipedia tokens (``kl``: how faithfully it reproduces the unmerged model, whether or
not the adapter helped). Prints JSON lines and markdown tables, writes ``--output/results.json``:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/merge_bench.py --recipes arc text \
        --settings gptq/4 gptq/3 gptq/2 gptq+sparsegpt/4 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from eora_ft.adapters.peft_bridge import build_lora_model, load_pretrained, lora_config
from eora_ft.data.heldout import heldout_texts
from eora_ft.config import CompressionArguments
from eora_ft.run.merge import merge_adapter
from eora_ft.run.compare_table import mean_std
from eora_ft.run.merge_report import BARE, REFERENCE, kept_share
from eora_ft.run.merge_run import locate, merge_calibration, recorded_compression, run_scorer

CONFIGS = {"arc": "recipes/configs/arc_nano_gptq2_eora.yaml", "text": "recipes/configs/text_nano_gptq2_eora.yaml"}
# what each recipe's table is judged on: the task's eval loss (arc), the held-out text of the training domain (text)
HEADLINE = {"arc": "arc_challenge/eval_loss", "text": "enwiki_heldout/ppl"}


def setting_flags(setting: str) -> list[str]:
    """``gptq/4`` -> GPTQ 4-bit g128; ``gptq+sparsegpt/4`` -> 2:4 SparseGPT with its kept weights at 4 bits."""
    method, bits = setting.split("/")
    return ["--compress_method", method, "--bits", bits]


def train(recipe: str, setting: str, seed: int, root: Path, fast: bool) -> Path:
    run = root / f"{recipe}_{setting.replace('/', '')}_s{seed}"
    if (run / "results.json").is_file():
        return run
    flags = [sys.executable, "-m", "eora_ft.cli", recipe, "--config", CONFIGS[recipe], *setting_flags(setting),
             "--seed", str(seed), "--output_dir", str(run), "--per_device_train_batch_size", "16",
             "--eval_base", "false", "--eval_strategy", "no", "--eval_on_start", "false", "--disable_tqdm", "true"]
    if fast:  # the CI-sized run of the test: a few steps, few windows
        flags += ["--max_steps", "2", "--ppl_max_windows", "2", "--eval_limit", "8", "--calib_num_samples", "4",
                  "--calib_seq_len", "128", "--adapter_calib_num_samples", "4", "--train_limit", "32"]
    subprocess.run(flags, check=True)
    return run


KL_TEXT = "eora_ft/assets/data/enwiki_heldout/wiki_49.txt"


def kl_windows(tokenizer, windows: int = 8, length: int = 512) -> torch.Tensor:
    """int64 ``[windows, length]``: the first tokens of the held-out Wikipedia text, where KL is measured."""
    ids = tokenizer(heldout_texts(KL_TEXT)[0].read())["input_ids"][: windows * length]
    return torch.tensor(ids).view(windows, length)


@torch.no_grad()
def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 next-token log-probabilities ``[windows, length, vocab]`` of ``model`` on ``ids``."""
    return torch.cat([torch.log_softmax(model(input_ids=ids[i:i + 2]).logits.float(), -1) for i in range(0, len(ids), 2)])


def kl_to(reference: torch.Tensor, model, ids: torch.Tensor) -> float:
    """Mean per-token KL(unmerged || model) in nats: how far a merge's predictions are from the unmerged model's."""
    return float((reference.exp() * (reference - log_probs(model, ids))).sum(-1).mean())


def merges(run: Path, calib_options: CompressionArguments, residual_rank: int) -> dict:
    """The scores of every row for one trained run (see the module docstring)."""
    adapter_dir, results = locate(run)
    model = load_pretrained(adapter_dir)
    tokenizer_dir = Path(results["summary"]["adapter base"].split(" (")[0])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir if (tokenizer_dir / "tokenizer.json").exists()
                                                  else results["config"]["EoraModelConfig"]["model_name_or_path"]))
    score, columns = run_scorer(results, tokenizer, progress=False)
    calib = merge_calibration(tokenizer, calib_options)
    recorded = recorded_compression(model.get_base_model(), results)
    ids = kl_windows(tokenizer)
    reference = log_probs(model, ids)
    with model.disable_adapter():
        stages = {BARE: score(model) | {"kl": kl_to(reference, model, ids)}}
    stages[REFERENCE] = score(model) | {"kl": 0.0}
    seconds = {}
    for how, rank in (("round", 0), ("regrid", 0), ("recompress", residual_rank)):
        merged = merge_adapter(load_pretrained(adapter_dir), calib, how=how, residual_rank=rank, recorded=recorded,
                               batch_size=calib_options.calib_batch_size, progress=False)
        seconds[how] = round(merged.seconds, 2)
        stages[how] = score(merged.model) | {"kl": kl_to(reference, merged.model, ids)}
        if rank:
            for kept_rank in sorted({rank // 2, rank}):
                factors = {p: f.truncate(kept_rank) for p, f in merged.residual.items()}
                config = lora_config(kept_rank, kept_rank, 0.0, sorted({p.rsplit(".", 1)[-1] for p in factors}))
                wrapped = build_lora_model(merged.model, factors, config)
                stages[f"{how} + residual r{kept_rank}"] = score(wrapped) | {"kl": kl_to(reference, wrapped, ids)}
                merged.model = wrapped.unload()
    return {"columns": columns, "stages": stages, "merge_seconds": seconds,
            "compression": results["summary"]["compression"], "train steps": results["summary"]["train steps"]}


def table(rows: list[dict]) -> str:
    lines = ["| recipe | compression | seed | row | " + " | ".join(label for _, label, _ in rows[0]["columns"])
             + " | kept of the adapter's change (headline) |", "|" + "---|" * (len(rows[0]["columns"]) + 5)]
    for row in rows:
        key = HEADLINE[row["recipe"]]
        for name, metrics in row["stages"].items():
            share = None if name in (BARE, REFERENCE) else kept_share(
                row["stages"][BARE][key], row["stages"][REFERENCE][key], metrics[key])
            cells = [f"{metrics[m]:.4f}" if k == "loss" else f"{100 * metrics[m]:.2f}" if k == "pct"
                     else f"{metrics[m]:.2f}" for m, _, k in row["columns"]]
            lines.append(f"| {row['recipe']} | {row['compression']} | {row['seed']} | {name} | " + " | ".join(cells)
                         + f" | {'' if share is None else f'{100 * share:.0f}%'} |")
    return "\n".join(lines)


def headline_table(rows: list[dict]) -> str:
    """One line per run: its headline metric at every row, each merge with the share of the adapter's change kept."""
    names = list(rows[0]["stages"])
    lines = ["| recipe | compression | seed | metric | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 4)]
    for row in rows:
        key = HEADLINE[row["recipe"]]
        label, kind = next((label, kind) for metric, label, kind in row["columns"] if metric == key)
        bare, reference = row["stages"][BARE][key], row["stages"][REFERENCE][key]
        cells = []
        for name in names:
            value = row["stages"][name][key]
            text = f"{value:.4f}" if kind == "loss" else f"{value:.2f}"
            share = None if name in (BARE, REFERENCE) else kept_share(bare, reference, value)
            cells.append((text if share is None else f"{text} ({100 * share:.0f}%)")
                         + ("" if name == REFERENCE else f", KL {row['stages'][name]['kl']:.4f}"))
        lines.append(f"| {row['recipe']} | {row['compression']} | {row['seed']} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(rows: list[dict]) -> str:
    """Per recipe and compression, over its seeds: each merge's share of the adapter's change kept (headline
    metric) and its KL to the unmerged model, mean ± sample std (± 0 with one seed). A share rests only on the seeds
    whose adapter moved the metric by more than ``MIN_CHANGE``: fewer than all are named in the cell."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        runs.setdefault((row["recipe"], row["compression"]), []).append(row)
    names = [name for name in rows[0]["stages"] if name not in (BARE, REFERENCE)]
    lines = ["| recipe | compression | seeds | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
    for (recipe, compression), members in runs.items():
        key, cells = HEADLINE[recipe], []
        for name in names:
            shares = [kept_share(r["stages"][BARE][key], r["stages"][REFERENCE][key], r["stages"][name][key])
                      for r in members if name in r["stages"]]
            share = mean_std(shares)
            defined = sum(value is not None for value in shares)
            # a seed whose adapter moved the metric by less than MIN_CHANGE has no share: say what the mean rests on
            count = "" if defined == len(shares) else f" ({defined} of {len(shares)} seeds)"
            kl = mean_std([r["stages"][name]["kl"] for r in members if name in r["stages"]])
            cells.append(f"–, KL {kl[0]:.4f} ± {kl[1]:.4f}" if share is None else
                         f"{100 * share[0]:.0f} ± {100 * share[1]:.0f}%{count}, KL {kl[0]:.4f} ± {kl[1]:.4f}")
        lines.append(f"| {recipe} | {compression} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["arc", "text"], choices=sorted(CONFIGS))
    parser.add_argument("--settings", nargs="+", default=["gptq/4", "gptq/3", "gptq/2", "gptq+sparsegpt/4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--residual_rank", type=int, default=16)
    parser.add_argument("--calib_num_samples", type=int, default=64)
    parser.add_argument("--calib_seq_len", type=int, default=512)
    parser.add_argument("--output", default="runs/merge_bench")
    parser.add_argument("--fast", action="store_true", help="CI size: 2 training steps, tiny calibration")
    args = parser.parse_args(argv)
    root = Path(args.output)
    calib_options = CompressionArguments(calib_num_samples=args.calib_num_samples, calib_seq_len=args.calib_seq_len)
    rows = []
    for recipe in args.recipes:
        for setting in args.settings:
            for seed in args.seeds:
                run = train(recipe, setting, seed, root, args.fast)
                done = run / "merge_bench_row.json"  # a finished row is kept: an interrupted benchmark resumes
                if done.is_file():
                    row = json.loads(done.read_text())
                else:
                    row = {"recipe": recipe, "setting": setting, "seed": seed,
                           **merges(run, calib_options, args.residual_rank)}
                    done.write_text(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "columns"}), flush=True)
                rows.append(row)
    (root / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    print()
    print(headline_table(rows))
    print()
    print(seed_table(rows))
    return rows


if __name__ == "__main__":
    main()
