"""Each initializer at its own learning rate, chosen on the validation split.

A comparison with several ``learning_rates`` runs every init at every rate. When its runs measured their eval
loss on a validation split carved from the training data (``validation_fraction``), each init (and the
ceiling) is reported at the rate whose reported adapter has the lowest validation loss, mean over seeds:
what someone reproducing a paper's table does for every method (LoftQ and EoRA tune each method's rate),
and never a choice made on the evaluation items the table reports. A choice at either end of the grid
is flagged: the best rate may lie beyond it.

Pure functions over a comparison dict (:mod:`eora_ft.run.compare_table` describes it).
"""

from __future__ import annotations

from dataclasses import dataclass

from eora_ft.run.compare_table import CEILING, cell, final_loss, group_runs, on_validation


@dataclass(frozen=True)
class RateChoice:
    """One method's sweep: ``losses`` (rate -> mean ± std over seeds of the validation loss), ``groups`` (rate
    -> its group label) and the ``rate`` with the lowest mean."""

    method: str
    rate: float
    losses: dict[float, tuple[float, float] | None]
    groups: dict[float, str]

    @property
    def chosen(self) -> str:
        """The group label at the chosen rate."""
        return self.groups[self.rate]

    @property
    def at_edge(self) -> bool:
        """Whether the chosen rate is the lowest or highest tried (with more than one tried)."""
        rates = sorted(self.losses)
        return len(rates) > 1 and self.rate in (rates[0], rates[-1])


def chosen_on_validation(comparison: dict) -> bool:
    """Whether every run measured its eval loss on a validation split (``validation_fraction`` > 0)."""
    runs = comparison["runs"].values()
    return bool(runs) and all(on_validation(run) for run in runs)


def method_of(comparison: dict, group: str) -> str:
    """The initializer a group ran (``lora`` for the ceiling)."""
    if group == CEILING or group.startswith(f"{CEILING}_lr"):
        return CEILING
    return group_runs(comparison, group)[0]["config"]["AdapterInitArguments"]["init_method"]


def choose_rates(comparison: dict) -> dict[str, RateChoice] | None:
    """Method -> :class:`RateChoice`, in the comparison's group order; None unless the runs were validated on a
    split of the training data and some method ran at more than one rate. A method whose every rate lacks a
    validation loss keeps its first rate."""
    if not chosen_on_validation(comparison):
        return None
    sweeps: dict[str, dict[float, str]] = {}
    for group in comparison["groups"]:
        rate = group_runs(comparison, group)[0]["config"]["SFTConfig"]["learning_rate"]
        sweeps.setdefault(method_of(comparison, group), {})[rate] = group
    if all(len(groups) < 2 for groups in sweeps.values()):
        return None
    choices = {}
    for method, groups in sweeps.items():
        losses = {rate: final_loss(comparison, group) for rate, group in groups.items()}
        measured = [rate for rate, loss in losses.items() if loss is not None]
        rate = min(measured, key=lambda r: losses[r][0]) if measured else next(iter(groups))
        choices[method] = RateChoice(method, rate, losses, groups)
    return choices


def reported_groups(comparison: dict, choices: dict[str, RateChoice] | None) -> dict[str, list[str]]:
    """The groups a table and its plot show: each method at its chosen rate, in the methods' order, when rates
    were chosen (``choices``); else every group."""
    groups = comparison["groups"]
    return {c.chosen: groups[c.chosen] for c in choices.values()} if choices else groups


def next_rate(choice: RateChoice) -> float:
    """One grid step beyond the edge ``choice`` sits at: the ratio of the two rates nearest that edge applied once
    more (1e-4, 3e-4, 1e-3 chosen at 1e-3 -> 3.33e-3), to 3 significant digits."""
    rates = sorted(choice.losses)
    value = rates[0] ** 2 / rates[1] if choice.rate == rates[0] else rates[-1] ** 2 / rates[-2]
    return float(f"{value:.3g}")


def sweep_markdown(comparison: dict, choices: dict[str, RateChoice]) -> list[str]:
    """The sweep as markdown lines: one row per method, the validation loss at each rate (the chosen one in
    bold), then which choices sit at the grid's edge."""
    rates = sorted({rate for choice in choices.values() for rate in choice.losses})
    seeds = max(len(labels) for labels in comparison["groups"].values())
    first = next(iter(comparison["runs"].values()))
    lines = ["## Learning rates, chosen on validation", "",
             "| init | " + " | ".join(f"lr {rate:g}" for rate in rates) + " | chosen |", "|" + "---|" * (len(rates) + 2)]
    for method, choice in choices.items():
        cells = []
        for rate in rates:
            text = cell(choice.losses.get(rate), "loss", seeds) if rate in choice.losses else "not run"
            cells.append(f"**{text}**" if rate == choice.rate else text)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {choice.rate:g} |")
    edge = [choice for choice in choices.values() if choice.at_edge]
    lines += ["", f"Validation loss of each run's reported adapter ({first['summary']['eval loss on']}; at the step "
              "load_best_model_at_end restored, else the last step), mean over seeds. The table above reports each "
              "init at the rate with the lowest mean: the evaluation items never chose anything."]
    if edge:
        lines[-1] += " At the edge of the grid (the best rate may lie beyond it; extend learning_rates): " + "; ".join(
            f"{c.method} at {c.rate:g}, the {'lowest' if c.rate == min(c.losses) else 'highest'} rate tried"
            for c in edge) + "."
    else:
        lines[-1] += " No choice is at the edge of the grid."
    return lines
