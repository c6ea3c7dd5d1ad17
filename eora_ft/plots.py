"""Pictures of a comparison: training and evaluation loss curves, one line per run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from eora_ft.report import default_file_mode  # noqa: E402


def plot_loss_curves(runs: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Two panels (train loss, eval loss vs step), one line per run label; written atomically as PNG.

    ``runs`` maps a label (e.g. ``eora`` or ``eora lr=1e-4``) to a results dict with ``train_loss`` and
    ``eval_loss`` lists of ``{"step", "loss"}``. An empty eval curve leaves its panel with a note.
    """
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key, name in ((axes[0], "train_loss", "training loss"), (axes[1], "eval_loss", "evaluation loss")):
        drawn = False
        for label, results in runs.items():
            curve = results.get(key) or []
            if curve:
                ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="o" if len(curve) < 15 else None,
                        markersize=3, label=label)
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
