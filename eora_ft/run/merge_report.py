"""What a merge keeps: the same scores for the bare base, the base + adapter (the reference) and the merged
model(s), and the share of the adapter's change each merge keeps.

``kept = (score(merged) - score(compressed)) / (score(base + adapter) - score(compressed))`` per metric: 100% is
the unmerged model's score, 0% the bare base's. It is a share of the adapter's *change*, whichever way the adapter
moved the metric (a fine-tuned adapter can make held-out text worse while it improves its task), so it says how
faithfully the merge reproduces the unmerged model, not whether the adapter helped. A metric the adapter did not
move (a change under :data:`MIN_CHANGE` of the compressed score) gets no share: a ratio of two round-off
differences would say anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from eora_ft.run.report import _cell

MIN_CHANGE = 1e-3  # relative: changes below 0.1% of the bare base's score are not shares worth printing
REFERENCE, BARE = "base + adapter", "compressed"


def kept_share(bare: float, reference: float, merged: float) -> float | None:
    """Share (fraction) of the adapter's change of a score (``reference - bare``) that ``merged`` keeps; None where
    the adapter changed it by less than :data:`MIN_CHANGE` of ``bare``."""
    change = reference - bare
    if abs(change) <= MIN_CHANGE * abs(bare):
        return None
    return (merged - bare) / change


def merge_markdown(report: dict) -> str:
    """The stages (rows) x metrics table, each merged row followed by its share of the adapter's change."""
    columns = [tuple(m) for m in report["metrics"]]
    stages = report["stages"]
    header = ["model", *[label for _, label, _ in columns]]
    lines = [f"# merge: {report['adapter']}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in stages.items():
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(key), kind) for key, _, kind in columns) + " |")
        if name not in (REFERENCE, BARE) and REFERENCE in stages and BARE in stages:
            shares = [kept_share(stages[BARE][key], stages[REFERENCE][key], metrics[key])
                      if key in metrics and key in stages[BARE] and key in stages[REFERENCE] else None
                      for key, _, kind in columns]
            lines.append("| ↳ kept of the adapter's change | "
                         + " | ".join("–" if s is None else f"{round(100 * s)}%" for s in shares) + " |")
    lines += ["", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report["summary"].items()]
    return "\n".join(lines) + "\n"


def write_merge_report(directory: Path, report: dict) -> None:
    """``merge_report.json`` and ``merge_report.md`` into ``directory`` (a directory being filled atomically)."""
    (directory / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "merge_report.md").write_text(merge_markdown(report))
