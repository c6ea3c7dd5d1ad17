"""results.json / results.md of a run, written atomically (temp file, then rename)."""

from __future__ import annotations

import json
from pathlib import Path

from eora_ft.utils.atomic import atomic_write_text

STAGE_DESCRIPTIONS = {
    "base": "uncompressed model",
    "compressed": "compressed weights, no adapter",
    "compensated": "compressed + initial adapter, before training",
    "finetuned": "compressed + trained adapter",
}
METRICS = [("arc_challenge/acc", "ARC-C acc", "pct"), ("arc_challenge/acc_norm", "ARC-C acc_norm", "pct"),
           ("enwiki_heldout/ppl", "enwiki held-out ppl", "ppl"), ("c4_heldout/ppl", "C4 held-out ppl", "ppl"),
           ("wikitext2/ppl", "WikiText-2 ppl", "ppl")]  # columns when a results dict names none


def init_description(from_adapter: str | None, init_method: str, rank: int, alpha: float, meta: dict) -> str:
    """The results' ``init`` line: the initializer (or the adapter started from) with its rank and alpha, and what
    the init entry's ``meta`` records of a refinement or a rank budget."""
    label = (f"adapter {from_adapter} r={meta['lora']['r']} alpha={meta['lora']['alpha']}" if from_adapter
             else f"{init_method} rank={rank} alpha={alpha}")
    if "refine" in meta:
        label += (f", refined {meta['refine']['steps']} steps (relative hidden-state error "
                  f"{meta['refine']['loss_first']:.4f} -> {meta['refine']['loss_last']:.4f})")
    if "rank_budget" in meta:  # per-linear ranks spending the uniform rank's parameters
        ranks = meta["rank_budget"]["ranks"].values()
        label += (f", rank budget {meta['rank_budget']['spent']:,} parameters "
                  f"({meta['rank_budget']['normalisation']} errors): ranks {min(ranks)}-{max(ranks)}")
    return label


def _cell(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "loss":  # mean cross-entropy in nats: fine-tuning moves it in the second decimal
        return f"{value:.4f}"
    return f"{100 * value:.2f}" if kind == "pct" else f"{value:.2f}"


def results_markdown(results: dict) -> str:
    """A table with one row per stage and one column per metric, plus the run's settings."""
    columns = [tuple(m) for m in results.get("metrics", METRICS)]
    lines = [f"# {results.get('title', 'eora_ft results')}", ""]
    header = ["stage", *[label for _, label, _ in columns], "what it is"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage, metrics in results["stages"].items():
        cells = [_cell(metrics.get(key), kind) for key, _, kind in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {STAGE_DESCRIPTIONS.get(stage, '')} |")
    lines.append("")
    kinds = {kind for _, _, kind in columns}
    notes = []
    if "pct" in kinds:
        notes.append("Accuracies in %: multiple choice by summed log-likelihood of each choice (acc_norm: divided by "
                     "the choice's length), GSM8K by exact match of the greedy answer (strict `#### n`, flexible: last "
                     "number).")
    if "loss" in kinds:
        notes.append("Eval loss: mean cross-entropy (nats per token) of the held-out examples' completions / "
                     "assistant turns, tokenized exactly as trained.")
    if "ppl" in kinds:
        notes.append("Perplexity over non-overlapping windows.")
    lines.append(" ".join(notes))
    if results.get("divergence"):
        lines += ["", f"**Training diverged**: {results['divergence']}. The finetuned row is what the diverged "
                      "adapter gives; lower the learning rate or start from another initialization."]
    if results.get("summary"):
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results["summary"].items()]
    if results.get("timings"):
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()]
    return "\n".join(lines) + "\n"


def write_results(output_dir: str | Path, results: dict) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``output_dir``; returns their paths."""
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    atomic_write_text(json_path, json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(md_path, results_markdown(results))
    return json_path, md_path


def model_card(results: dict) -> str:
    """A Hugging Face style ``README.md`` for a run's adapter: metadata header, results, provenance, usage."""
    summary = results.get("summary", {})
    config = results.get("config", {})
    compression = config.get("CompressionArguments", {})
    init = config.get("AdapterInitArguments", {})
    base = str(summary.get("compressed base", ""))
    tags = ["eora_ft", "lora", str(compression.get("compress_method", "")), str(init.get("init_method", "")),
            str(results.get("task", ""))]
    lines = ["---", "library_name: peft", f"base_model: {summary.get('model', '')}",
             "tags: [" + ", ".join(t for t in tags if t) + "]", "---", ""]
    body = results_markdown(results).splitlines()
    lines += body[:1] + ["", "A LoRA adapter (plain PEFT files in `adapter/`) trained by eora_ft on top of a compressed, "
                         "frozen base model: the base was compressed, the adapter initialised from the compression "
                         "error, then only the adapter was fine-tuned.", ""] + body[1:]
    curve = results.get("train_loss") or []
    if curve:
        lines += ["", f"Training loss: {curve[0]['loss']:.4f} at step {curve[0]['step']} -> "
                      f"{curve[-1]['loss']:.4f} at step {curve[-1]['step']}."]
    adapter_base = str(summary.get("adapter base", base))
    path, _, kind = adapter_base.rpartition(" (")
    kind = kind.rstrip(")")
    lines += ["", "## Use", "", f"The adapter belongs to the compressed base it was trained on: `{path}` ({kind}), "
              "named as `base_model_name_or_path` in `adapter/adapter_config.json`.", ""]
    if kind == "plain":
        lines += ["With transformers and PEFT:", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
                  'model = AutoPeftModelForCausalLM.from_pretrained("adapter")  # this folder\'s adapter/', "```", ""]
    elif kind == "compressed-tensors":  # PEFT wraps dense weights: decompress on load
        lines += ["With transformers, PEFT and compressed-tensors (no eora_ft needed):", "", "```python",
                  "from peft import AutoPeftModelForCausalLM", "from transformers import CompressedTensorsConfig", "",
                  'model = AutoPeftModelForCausalLM.from_pretrained(  # this folder\'s adapter/',
                  '    "adapter", quantization_config=CompressedTensorsConfig(run_compressed=False))', "```", ""]
    lines += ["With eora_ft installed (any base format eora_ft writes or reads):", "", "```python",
              "from eora_ft.adapters import load_pretrained", "",
              'model = load_pretrained("adapter")  # this folder\'s adapter/', "```", "",
              "The full configuration of the run is in `results.json` (`config`)."]
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: str | Path, results: dict) -> Path:
    """Write ``README.md`` (see :func:`model_card`) into ``output_dir``."""
    path = Path(output_dir) / "README.md"
    atomic_write_text(path, model_card(results))
    return path
