"""The comparison's numbers: runs grouped by (initializer, learning rate) over seeds, mean ± std of every
metric, steps to QLoRA's final eval loss, and which rows the seeds' spread cannot separate.

A comparison dict (what :func:`eora_ft.run.compare.compare` returns) holds ``runs`` (label -> one run's
results dict) and ``groups`` (group label -> the run labels of its seeds). Everything here is pure:
it reads those dicts and returns numbers or text.
"""

from __future__ import annotations

import math
import statistics

CEILING = "lora"  # group label of plain LoRA on the uncompressed model
TARGET_INIT = "qlora"  # steps-to-target: the first step at which an init's eval loss reaches QLoRA's final one


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """``(mean, sample std)`` of the finite ``values`` (std 0 for one value); None when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _final(curve: list[dict]) -> float | None:
    return curve[-1]["loss"] if curve else None


def group_runs(comparison: dict, label: str) -> list[dict]:
    """The results dicts of one group's seeds."""
    return [comparison["runs"][run] for run in comparison["groups"][label]]


def group_stat(comparison: dict, label: str, stage: str, key: str) -> tuple[float, float] | None:
    """Mean ± std over seeds of metric ``key`` at ``stage`` (``compensated``, ``finetuned``, ...)."""
    return mean_std([run["stages"].get(stage, {}).get(key) for run in group_runs(comparison, label)])


def on_validation(run: dict) -> bool:
    """Whether a run measured its eval loss on a validation split of its training data (``validation_fraction``)."""
    return str(run.get("summary", {}).get("eval loss on", "")).startswith("validation")


def reported_eval_loss(run: dict) -> float | None:
    """The eval loss of the adapter a run reports and saves: at the step ``load_best_model_at_end`` restored
    (``run["best"]``), else the last logged one; None without an eval curve."""
    best = run.get("best") or {}
    return best["eval_loss"] if best.get("eval_loss") is not None else _final(run.get("eval_loss") or [])


def final_loss(comparison: dict, label: str, curve: str = "eval_loss") -> tuple[float, float] | None:
    """Mean ± std over seeds of the reported adapter's eval loss (:func:`reported_eval_loss`) or, for
    ``curve="train_loss"``, of the last logged training loss."""
    runs = group_runs(comparison, label)
    if curve == "eval_loss":
        return mean_std([reported_eval_loss(run) for run in runs])
    return mean_std([_final(run.get(curve) or []) for run in runs])


def steps_to_target(comparison: dict, label: str) -> tuple[list[int | None], float] | None:
    """Per seed, the first logged step whose eval loss is at most QLoRA's final eval loss (mean over its
    seeds; None where never reached), and that target. With several learning rates the target is QLoRA at
    its best rate (the lowest mean final eval loss): what a user who tunes QLoRA's rate would reach.
    None without a qlora group or eval curves."""
    finals = [final_loss(comparison, g) for g in comparison["groups"]
              if g == TARGET_INIT or g.startswith(f"{TARGET_INIT}_lr")]
    finals = [f for f in finals if f is not None]
    if not finals:
        return None
    target = min(finals)
    steps = []
    for run in group_runs(comparison, label):
        curve = run.get("eval_loss") or []
        steps.append(next((p["step"] for p in curve if p["loss"] <= target[0]), None))
    return steps, target[0]


# metric kinds where lower is better (perplexity; a cross-entropy such as the held-out completion loss)
LOWER_IS_BETTER = ("ppl", "loss")


def inseparable(rows: dict[str, tuple[float, float] | None], lower_is_better: bool) -> set[str]:
    """Rows whose mean ± std band overlaps the best row's band (the best included when another overlaps it).

    With one seed there is no band (std 0): only exact ties overlap."""
    present = {label: value for label, value in rows.items() if value is not None}
    if len(present) < 2:
        return set()
    best = (min if lower_is_better else max)(present, key=lambda label: present[label][0])
    low, high = present[best][0] - present[best][1], present[best][0] + present[best][1]
    overlapping = {label for label, (m, s) in present.items()
                   if label != best and m - s <= high and m + s >= low}
    return overlapping | ({best} if overlapping else set())


def with_sampling_error(value: tuple[float, float] | None, items: int) -> tuple[float, float] | None:
    """An accuracy's ``(mean, seed std)`` with the std widened by the evaluation set's binomial standard
    error ``sqrt(p (1 - p) / items)``: seeds vary the training, but every seed is scored on the same
    ``items`` questions, one sample of the task, so a difference smaller than that error is not a finding
    about the task (299 ARC items at 25%: 2.5 points)."""
    if value is None or items <= 0:
        return value
    mean, std = value
    return mean, math.sqrt(std ** 2 + max(mean * (1.0 - mean), 0.0) / items)


def cell(value: tuple[float, float] | float | None, kind: str, seeds: int) -> str:
    """``30.00 ± 1.20`` (accuracies in %), ``441.2 ± 3.1`` or ``–``; no ± with one seed."""
    if value is None:
        return "–"
    mean, std = value if isinstance(value, tuple) else (value, 0.0)
    scale, digits = (100.0, 2) if kind == "pct" else (1.0, 2 if kind == "ppl" else 4)
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if seeds > 1 else "")


def divergences(comparison: dict, label: str) -> list[str]:
    """The divergence reasons of a group's seeds (empty when none diverged)."""
    return [run["divergence"] for run in group_runs(comparison, label) if run.get("divergence")]
