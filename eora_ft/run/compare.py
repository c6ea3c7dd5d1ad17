"""One compression, several adapter initializations, the same fine-tuning budget over several seeds: one
table, one plot.

Each (initializer, learning rate, seed) is a full recipe run (:func:`eora_ft.run.pipeline.run`) in its own
``output_dir/<label>/`` with its own model card; all of them share one compressed base from the cache.
The comparison writes ``results.json``, ``results.md`` (rows: compression x init, mean ± std over seeds;
columns: each metric before and after fine-tuning, final eval loss, steps to QLoRA's final eval loss) and
``loss_curves.png`` (mean and seed band per init) into ``output_dir``. Plain LoRA on the uncompressed
model is the ceiling row, the compressed model without adapter the floor.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from eora_ft.run.compare_table import (
    LOWER_IS_BETTER,
    CEILING,
    cell,
    divergences,
    final_loss,
    group_stat,
    inseparable,
    steps_to_target,
    with_sampling_error,
)
from eora_ft.run.compare_select import (choose_rates, chosen_on_validation, next_rate, reported_groups,
                                          sweep_markdown)
from eora_ft.config import UNCOMPRESSED, AdapterInitArguments, CompressionArguments, EoraModelConfig, EoraSFTConfig, TaskArguments
from eora_ft.init import INITIALIZERS, REBASING_INITS
from eora_ft.run.pipeline import run, run_config
from eora_ft.run.plots import plot_loss_curves
from eora_ft.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class CompareArguments:
    """Which initializers to compare, over which seeds, with an optional learning-rate sweep for each."""

    inits: list[str] = field(default_factory=lambda: ["qlora", "loftq", "svd", "eora"],
                             metadata={"help": f"Initializers to compare, from {sorted(INITIALIZERS)}."})
    learning_rates: list[float] | None = field(
        default=None, metadata={"help": "Fine-tune each init at each of these rates (None = the config's learning_rate)."})
    seeds: list[int] | None = field(
        default=None, metadata={"help": "Run every init once per seed (training order, dropout, random factors) and "
                                        "report mean ± std; None = the config's seed only."})
    ceiling: bool = field(
        default=True, metadata={"help": "Add the ceiling row: plain LoRA (B = 0) fine-tuned on the uncompressed model."})
    resume: bool = field(
        default=True, metadata={"help": "Reuse a run whose folder already holds results.json written with the same "
                                        "configuration, so an interrupted comparison restarts at its first unfinished "
                                        "run; false reruns every run."})
    grid_extensions: int = field(
        default=0, metadata={"help": "With learning_rates chosen on a validation split (validation_fraction): while an "
                                     "init's chosen rate is the lowest or highest it ran, run it at the next rate beyond "
                                     "(the ratio of the two rates nearest that end), at most this many times; 0 = "
                                     "report a choice at the edge as such."})

    def __post_init__(self) -> None:
        unknown = [name for name in self.inits if name not in INITIALIZERS]
        if unknown or not self.inits:
            raise ValueError(f"inits={self.inits} must be a non-empty list from {sorted(INITIALIZERS)}; unknown: {unknown}")
        if len(set(self.inits)) != len(self.inits):
            raise ValueError(f"inits={self.inits} repeats a name")
        if self.learning_rates is not None and (not self.learning_rates or min(self.learning_rates) <= 0):
            raise ValueError(f"learning_rates={self.learning_rates} must be positive numbers")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds={self.seeds} must be a non-empty list of distinct integers (or None)")
        if self.grid_extensions < 0 or (self.grid_extensions and len(set(self.learning_rates or [])) < 2):
            raise ValueError(f"grid_extensions={self.grid_extensions} must be >= 0, and above 0 it needs at least two "
                             f"learning_rates to take the grid's ratio from (learning_rates={self.learning_rates})")


def _label(init: str, lr: float | None) -> str:
    return init if lr is None else f"{init}_lr{lr:g}"


def compare(task_args: TaskArguments, compress_args: CompressionArguments, init_args: AdapterInitArguments,
            training_args: EoraSFTConfig, model_args: EoraModelConfig, compare_args: CompareArguments) -> dict:
    """Run every (init, learning rate, seed) with the same data and budget; return the comparison dict.

    The ceiling (plain LoRA on the uncompressed model) runs first at each rate and seed when asked for."""
    out = Path(training_args.output_dir)
    rates = compare_args.learning_rates or [None]
    seeds = compare_args.seeds or [training_args.seed]
    if compare_args.grid_extensions and task_args.validation_fraction == 0:
        raise ValueError(f"grid_extensions={compare_args.grid_extensions} extends the learning-rate grid where the "
                         "validation loss chose its edge: set validation_fraction (e.g. 0.1) and an eval_strategy")
    plans = ([(CEILING, "qlora", UNCOMPRESSED)] if compare_args.ceiling else []) + \
        [(init, init, compress_args.compress_method) for init in compare_args.inits]
    runs: dict[str, dict] = {}
    groups: dict[str, list[str]] = {}
    base = None
    scored_bases: dict[str, dict] = {}  # main process: each compressed base is evaluated once per comparison
    total = len(plans) * len(rates) * len(seeds)

    def run_group(name: str, init: str, method: str, lr: float | None) -> None:
        nonlocal base
        group = _label(name, lr)
        for seed in seeds:
            label = group if len(seeds) == 1 else f"{group}_seed{seed}"
            logger.info("comparison run %s (%d of %d)", label, len(runs) + 1, max(total, len(runs) + 1))
            run_init = dataclasses.replace(init_args, init_method=init)
            run_compress = dataclasses.replace(compress_args, compress_method=method)
            run_task = copy.deepcopy(task_args)
            run_task.eval_base = task_args.eval_base and base is None  # the uncompressed model once
            run_training = copy.deepcopy(training_args)
            run_training.output_dir = str(out / label)
            run_training.seed = seed
            if lr is not None:
                run_training.learning_rate = lr
            run_args = (run_task, run_compress, run_init, run_training, model_args)
            results = finished_run(Path(run_training.output_dir), run_config(*run_args)) \
                if compare_args.resume else None
            if results is None:
                results = run(*run_args, scored_bases=scored_bases)
            if "compressed" in results.get("stages", {}) and "compressed base" in results.get("summary", {}):
                scored_bases.setdefault(results["summary"]["compressed base"], results["stages"]["compressed"])
            if base is None:
                base = results.get("stages", {}).get("base")
            runs[label] = results
            groups.setdefault(group, []).append(label)

    for plan in plans:
        for lr in rates:
            run_group(*plan, lr)
    by_method = {name: (name, init, method) for name, init, method in plans}
    for _ in range(compare_args.grid_extensions):
        beyond = _beyond_the_edges(runs, groups)
        for method, lr in beyond:
            logger.info("%s chose the edge of its learning-rate grid on validation: running it at %g", method, lr)
            run_group(*by_method[method], lr)
        if not beyond:
            break
    comparison = {"title": f"{task_args.task}: {compress_args.describe()}, initializers compared on {model_args.model_name_or_path}",
                  "base": base or {}, "runs": runs, "groups": groups, "inits": compare_args.inits,
                  "learning_rates": compare_args.learning_rates, "seeds": seeds}
    if PartialState().is_main_process:
        write_comparison(out, comparison)
    PartialState().wait_for_everyone()
    return comparison


def _beyond_the_edges(runs: dict[str, dict], groups: dict[str, list[str]]) -> list[tuple[str, float]]:
    """``[(method, rate)]``: the next rate for each method whose validation loss chose the edge of its grid. Decided
    by the main process (the other ranks hold no results) and broadcast, so every rank runs the same groups."""
    state = PartialState()
    decided: list = [[]]
    if state.is_main_process:
        choices = choose_rates({"runs": runs, "groups": groups}) or {}
        decided[0] = [(c.method, next_rate(c)) for c in choices.values()
                      if c.at_edge and c.losses[c.rate] is not None and next_rate(c) not in c.losses]
    if state.num_processes > 1:
        broadcast_object_list(decided)
    return decided[0]


# fields that differ between the ranks of one launch, or between the runs of one comparison, without
# changing what a run computes
_NOT_COMPARED = {"SFTConfig": ("local_rank",), "TaskArguments": ("eval_base",)}


def _comparable(config: dict) -> dict:
    config = json.loads(json.dumps(config, default=str))  # as results.json holds it: tuples -> lists, paths -> str
    for section, keys in _NOT_COMPARED.items():
        for key in keys:
            config.get(section, {}).pop(key, None)
    return config


def finished_run(output_dir: Path, config: dict) -> dict | None:
    """The results of a finished run in ``output_dir`` if its ``results.json`` records ``config``, else None.

    The main process reads the file and every rank follows its answer (one small broadcast), so all ranks
    skip the run or all run it. Ranks other than the main one get ``{}``, as from :func:`run`."""
    state = PartialState()
    found: list = [None]
    if state.is_main_process:
        path = output_dir / "results.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved is not None and _comparable(saved.get("config", {})) != _comparable(config):
            logger.info("%s was written with another configuration: running again", path)
            saved = None
        elif saved is not None:
            logger.info("reusing the finished run in %s (resume: false runs it again)", output_dir)
        found[0] = saved
    if state.num_processes == 1:
        return found[0]
    finished = [found[0] is not None]
    broadcast_object_list(finished)
    return (found[0] if state.is_main_process else {}) if finished[0] else None


def comparison_markdown(comparison: dict) -> str:
    """One row per compression x init (mean ± std over seeds), each metric before -> after fine-tuning,
    the final eval loss, the steps to QLoRA's final eval loss; cells the seeds cannot separate from the
    column's best are marked."""
    runs, groups = comparison["runs"], comparison.get("groups") or {label: [label] for label in comparison["runs"]}
    comparison = {**comparison, "groups": groups}
    n_seeds = max(len(labels) for labels in groups.values())
    validated = chosen_on_validation(comparison)
    choices = choose_rates(comparison)
    groups = reported_groups(comparison, choices)  # with chosen rates, the sweep follows the table
    reported_steps = any(run.get("best") for run in runs.values())
    compressed_groups = [g for g in groups if g != CEILING and not g.startswith(f"{CEILING}_lr")]
    first = runs[groups[compressed_groups[0] if compressed_groups else next(iter(groups))][0]]
    metrics = [tuple(m) for m in first["metrics"]]
    has_target = steps_to_target(comparison, next(iter(groups))) is not None
    header = ["compression", "init", "lr (chosen on validation)" if choices else "lr", "seeds"]
    for _, label, _ in metrics:
        header += [f"{label} before", f"{label} after"]
    header += ["validation loss" if validated else "final eval loss"] + (["reported step"] if reported_steps else []) \
        + (["steps to qlora's eval loss"] if has_target else []) + ["final train loss"]
    lines = [f"# {comparison['title']}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    blank_tail = ["–"] * (len(header) - 4 - 2 * len(metrics))

    base = comparison.get("base") or {}
    if base:
        row = ["none (uncompressed)", "no adapter", "–", "–"]
        for key, _, kind in metrics:
            row += [cell(base.get(key), kind, 1), "–"]
        lines.append("| " + " | ".join(row + blank_tail) + " |")
    compression = first["summary"]["compression"]
    # a LoftQ run's "compressed" stage is its own re-compressed base: take the plain one from another init
    plain = next((runs[g[0]] for label, g in groups.items() if label in compressed_groups
                  and runs[g[0]]["config"]["AdapterInitArguments"]["init_method"] not in REBASING_INITS), first)
    row = [compression, "none (no adapter)", "–", "–"]
    for key, _, kind in metrics:
        row += [cell(plain["stages"].get("compressed", {}).get(key), kind, 1), "–"]
    lines.append("| " + " | ".join(row + blank_tail) + " |")

    flagged = {}  # column -> labels whose band overlaps the best's, among the compressed inits
    items = int(first["summary"].get("eval items") or 0)
    for key, _, kind in metrics:
        bands = {g: group_stat(comparison, g, "finetuned", key) for g in compressed_groups}
        if kind == "pct":  # every seed answers the same items: their sampling error bounds what can be told apart
            bands = {g: with_sampling_error(band, items) for g, band in bands.items()}
        flagged[key] = inseparable(bands, lower_is_better=kind in LOWER_IS_BETTER)
    flagged["eval_loss"] = inseparable({g: final_loss(comparison, g) for g in compressed_groups}, True)
    for label, members in groups.items():
        results = runs[members[0]]
        init = results["config"]["AdapterInitArguments"]["init_method"] if label in compressed_groups else CEILING
        lr = results["config"]["SFTConfig"]["learning_rate"]
        row = [results["summary"]["compression"], init, f"{lr:g}", str(len(members))]
        for key, _, kind in metrics:
            mark = " ≈" if label in flagged[key] else ""
            row += [cell(group_stat(comparison, label, "compensated", key), kind, len(members)),
                    cell(group_stat(comparison, label, "finetuned", key), kind, len(members)) + mark]
        row.append(cell(final_loss(comparison, label), "loss", len(members))
                   + (" ≈" if label in flagged["eval_loss"] else ""))
        if reported_steps:  # per seed, the step load_best_model_at_end restored
            row.append(", ".join(str((runs[m].get("best") or {}).get("step", "last")) for m in members))
        if has_target:
            reached = steps_to_target(comparison, label)
            row.append(", ".join("never" if s is None else str(s) for s in reached[0]) if reached else "–")
        diverged = divergences(comparison, label)
        row.append(cell(final_loss(comparison, label, "train_loss"), "loss", len(members))
                   + (f" (diverged {len(diverged)}/{len(members)})" if diverged else ""))
        lines.append("| " + " | ".join(row) + " |")

    summary = first["summary"]
    after = ("the same adapter fine-tuned, at the reported step (the initial adapter when no step beat it on "
             "validation)" if reported_steps else "the same adapter fine-tuned")
    lines += ["", f"Before = the initial adapter on the compressed base, after = {after} "
              f"({summary['train steps']} steps, {summary['train items']} training items, the same budget for every "
              f"init); {summary['eval items']} evaluation items; {summary['calibration tokens']} compressor "
              f"calibration tokens, {summary.get('adapter calibration tokens', '–')} adapter calibration tokens. "
              "For loftq and eora_alt the base is their own re-compressed weights; lora is the ceiling: plain LoRA (B = 0) on "
              "the uncompressed model. Accuracies in %."]
    if n_seeds > 1:
        lines += ["", f"Mean ± sample std over {n_seeds} seeds. ≈ marks a fine-tuned result whose mean ± std band "
                  "overlaps the best compressed init's band in that column (the best included): these seeds cannot "
                  "separate those rows."]
    else:
        lines += ["", "One seed: no spread is measured, so no difference in this table is known to exceed run-to-run "
                  "noise (rerun with --seeds 0 1 2)."]
    if any(kind == "pct" for _, _, kind in metrics) and items:
        lines[-1] += (f" For accuracies the band also holds the evaluation set's binomial standard error "
                      f"(sqrt(p(1-p)/{items}), {100 * math.sqrt(0.25 * 0.75 / items):.1f} points at 25%): every "
                      "seed answers the same items, one sample of the task.")
    if has_target:
        lines += ["", "Steps to qlora's eval loss: per seed, the first logged step at which the init's eval loss is at "
                  "most QLoRA's (its reported adapter's: at the restored step, else the last; mean over its seeds; with "
                  "several rates, QLoRA at the rate where it is lowest); never = not within the budget."]
    if any(divergences(comparison, label) for label in groups):
        lines += ["", "Diverged runs (NaN loss, or a training loss above its start for several logged steps) are "
                  "counted in the last column; their after-columns are what the diverged adapter gives."]
    if validated:
        lines += ["", f"Eval losses (the validation loss column, the curves, the steps) are measured on "
                  f"{first['summary']['eval loss on']}, never on the evaluation items the other columns report."]
    if choices:
        lines += [""] + sweep_markdown(comparison, choices)
    lines += ["", "![loss curves](loss_curves.png)"]
    return "\n".join(lines) + "\n"


def write_comparison(output_dir: Path, comparison: dict) -> None:
    """``results.json``, ``results.md`` (also as ``README.md``: the comparison's card) and ``loss_curves.png``."""
    atomic_write_text(output_dir / "results.json", json.dumps(comparison, indent=2, default=str) + "\n")
    text = comparison_markdown(comparison)
    atomic_write_text(output_dir / "results.md", text)
    atomic_write_text(output_dir / "README.md", text)
    groups = comparison.get("groups")
    if groups:  # the curves of each init at its chosen rate
        groups = reported_groups(comparison, choose_rates(comparison))
    plot_loss_curves(comparison["runs"], output_dir / "loss_curves.png", comparison["title"], groups=groups)
