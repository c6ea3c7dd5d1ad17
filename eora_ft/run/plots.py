"""Pictures of a comparison: training and evaluation loss curves, one line per run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from eora_ft.utils.atomic import default_file_mode  # noqa: E402
from eora_ft.run.compare_table import on_validation  # noqa: E402


def _band(curves: list[list[dict]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps logged by every seed, and the mean, min and max loss over seeds at each."""
    steps = sorted(set.intersection(*[{p["step"] for p in curve} for curve in curves]))
    at = [{p["step"]: p["loss"] for p in curve} for curve in curves]
    values = [[seed[step] for seed in at] for step in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def line_styles(labels: list[str]) -> dict[str, dict]:
    """Matplotlib ``color`` and ``linestyle`` per group label: one colour per initializer, one line style per
    learning rate (labels ``{init}_lr{rate}`` of a rate sweep), so each init reads as one family of lines."""
    inits = list(dict.fromkeys(label.split("_lr")[0] for label in labels))
    rates = list(dict.fromkeys(label.split("_lr")[1] for label in labels if "_lr" in label))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ["-", "--", ":", "-."]
    return {label: {"color": colours[inits.index(label.split("_lr")[0]) % len(colours)],
                    "linestyle": dashes[rates.index(label.split("_lr")[1]) % len(dashes)] if "_lr" in label else "-"}
            for label in labels}


def plot_loss_curves(runs: dict[str, dict], path: str | Path, title: str = "",
                     groups: dict[str, list[str]] | None = None) -> Path:
    """Two panels (train loss, eval loss vs step), one line per group (styled by :func:`line_styles`);
    written atomically as PNG.

    ``runs`` maps a run label (e.g. ``eora_seed1``) to a results dict with ``train_loss`` and ``eval_loss``
    lists of ``{"step", "loss"}``; ``groups`` maps a line's label (e.g. ``eora``) to its runs (its seeds:
    the line is their mean, the shaded band their min..max). None: one line per run. An empty eval
    curve leaves its panel with a note; runs whose summary says their eval loss is on a validation split
    title that panel "validation loss".
    """
    path = Path(path)
    groups = groups or {label: [label] for label in runs}
    styles = line_styles(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    eval_name = "validation loss" if runs and all(on_validation(run) for run in runs.values()) else "evaluation loss"
    for ax, key, name in ((axes[0], "train_loss", "training loss"), (axes[1], "eval_loss", eval_name)):
        drawn = False
        for label, members in groups.items():
            curves = [runs[member].get(key) or [] for member in members]
            if all(curves):
                steps, mean, low, high = _band(curves)
                line, = ax.plot(steps, mean, marker="o" if len(steps) < 15 else None, markersize=3, **styles[label],
                                label=label if len(members) == 1 else f"{label} ({len(members)} seeds)")
                if len(members) > 1:
                    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged\n(eval_strategy: no)", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
