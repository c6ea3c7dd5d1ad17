"""One compression, several adapter initializations, the same fine-tuning budget: one table, one plot.

Each (initializer, learning rate) is a full recipe run (:func:`eora_ft.pipeline.run`) in its own
``output_dir/<label>/`` with its own model card; the comparison writes ``results.json``,
``results.md`` (rows: compression x init; columns: each metric before and after fine-tuning) and
``loss_curves.png`` into ``output_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState

from eora_ft.config import AdapterInitArguments, CompressionArguments, EoraModelConfig, EoraSFTConfig, TaskArguments
from eora_ft.init import INITIALIZERS
from eora_ft.pipeline import run
from eora_ft.plots import plot_loss_curves
from eora_ft.report import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class CompareArguments:
    """Which initializers to compare, and an optional learning-rate sweep for each."""

    inits: list[str] = field(default_factory=lambda: ["qlora", "loftq", "svd", "eora"],
                             metadata={"help": f"Initializers to compare, from {sorted(INITIALIZERS)}."})
    learning_rates: list[float] | None = field(
        default=None, metadata={"help": "Fine-tune each init at each of these rates (None = the config's learning_rate)."})

    def __post_init__(self) -> None:
        unknown = [name for name in self.inits if name not in INITIALIZERS]
        if unknown or not self.inits:
            raise ValueError(f"inits={self.inits} must be a non-empty list from {sorted(INITIALIZERS)}; unknown: {unknown}")
        if len(set(self.inits)) != len(self.inits):
            raise ValueError(f"inits={self.inits} repeats a name")
        if self.learning_rates is not None and (not self.learning_rates or min(self.learning_rates) <= 0):
            raise ValueError(f"learning_rates={self.learning_rates} must be positive numbers")


def _label(init: str, lr: float | None) -> str:
    return init if lr is None else f"{init}_lr{lr:g}"


def compare(task_args: TaskArguments, compress_args: CompressionArguments, init_args: AdapterInitArguments,
            training_args: EoraSFTConfig, model_args: EoraModelConfig, compare_args: CompareArguments) -> dict:
    """Run every (init, learning rate) with the same data, budget and seed; return the comparison dict."""
    out = Path(training_args.output_dir)
    rates = compare_args.learning_rates or [None]
    runs: dict[str, dict] = {}
    base = None
    for init in compare_args.inits:
        for lr in rates:
            label = _label(init, lr)
            logger.info("comparison run %s (%d of %d)", label, len(runs) + 1, len(compare_args.inits) * len(rates))
            run_init = copy.deepcopy(init_args)
            run_init.init_method = init
            run_task = copy.deepcopy(task_args)
            run_task.eval_base = task_args.eval_base and base is None  # the uncompressed model once
            run_training = copy.deepcopy(training_args)
            run_training.output_dir = str(out / label)
            if lr is not None:
                run_training.learning_rate = lr
            results = run(run_task, compress_args, run_init, run_training, model_args)
            if base is None:
                base = results.get("stages", {}).get("base")
            runs[label] = results
    comparison = {"title": f"{task_args.task}: {compress_args.describe()}, initializers compared on {model_args.model_name_or_path}",
                  "base": base or {}, "runs": runs, "inits": compare_args.inits, "learning_rates": compare_args.learning_rates}
    if PartialState().is_main_process:
        write_comparison(out, comparison)
    PartialState().wait_for_everyone()
    return comparison


def comparison_markdown(comparison: dict) -> str:
    """The paper's shape: one row per compression x init, each metric before -> after fine-tuning."""
    runs = comparison["runs"]
    first = next(iter(runs.values()))
    metrics = [tuple(m) for m in first["metrics"]]
    header = ["compression", "init", "lr"]
    for _, label, _ in metrics:
        header += [f"{label} before", f"{label} after"]
    header += ["final train loss"]
    lines = [f"# {comparison['title']}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(value, kind):
        if value is None:
            return "–"
        return f"{100 * value:.2f}" if kind == "pct" else f"{value:.2f}"

    base = comparison.get("base") or {}
    if base:
        row = ["none (uncompressed)", "–", "–"]
        for key, _, kind in metrics:
            row += [cell(base.get(key), kind), "–"]
        lines.append("| " + " | ".join(row + ["–"]) + " |")
    compression = first["summary"]["compression"]
    # a LoftQ run's "compressed" stage is its own re-compressed base: take the plain one from another init
    plain = next((r for r in runs.values() if r["config"]["AdapterInitArguments"]["init_method"] != "loftq"), first)
    no_adapter = plain["stages"].get("compressed", {})
    row = [compression, "none (no adapter)", "–"]
    for key, _, kind in metrics:
        row += [cell(no_adapter.get(key), kind), "–"]
    lines.append("| " + " | ".join(row + ["–"]) + " |")
    for label, results in runs.items():
        init = results["config"]["AdapterInitArguments"]["init_method"]
        lr = results["config"]["SFTConfig"]["learning_rate"]
        before, after = results["stages"].get("compensated", {}), results["stages"].get("finetuned", {})
        row = [compression, init, f"{lr:g}"]
        for key, _, kind in metrics:
            row += [cell(before.get(key), kind), cell(after.get(key), kind)]
        losses = results.get("train_loss") or []
        row.append(f"{losses[-1]['loss']:.4f}" if losses else "–")
        lines.append("| " + " | ".join(row) + " |")
    summary = first["summary"]
    lines += ["", f"Before = the initial adapter on the compressed base, after = the same adapter fine-tuned "
              f"({summary['train steps']} steps, {summary['train items']} training items, the same seed for every "
              f"init); {summary['eval items']} evaluation items; {summary['calibration tokens']} calibration tokens. "
              "For loftq the base is LoftQ's own re-compressed weights. Accuracies in %.",
              "", "![loss curves](loss_curves.png)"]
    return "\n".join(lines) + "\n"


def write_comparison(output_dir: Path, comparison: dict) -> None:
    """``results.json``, ``results.md`` (also as ``README.md``: the comparison's card) and ``loss_curves.png``."""
    atomic_write_text(output_dir / "results.json", json.dumps(comparison, indent=2, default=str) + "\n")
    text = comparison_markdown(comparison)
    atomic_write_text(output_dir / "results.md", text)
    atomic_write_text(output_dir / "README.md", text)
    plot_loss_curves(comparison["runs"], output_dir / "loss_curves.png", comparison["title"])
