"""Greedy rank allocation: within budget, at the brute-force optimum on a small case, normalisation matters."""

import itertools

import pytest

from eora_ft.init.rank_budget import allocate_ranks


def _curve(decay: float, start: float = 1.0, length: int = 9) -> list[float]:
    return [start * decay ** (r / 2) for r in range(length)]  # squared error decays geometrically


def test_budget_respected_and_uniform_when_the_linears_are_alike():
    curves = {f"l{i}": _curve(0.5) for i in range(4)}
    costs = {path: 10 for path in curves}
    ranks = allocate_ranks(curves, costs, budget=4 * 3 * 10)
    assert ranks == {path: 3 for path in curves}


def test_greedy_finds_the_brute_force_optimum_of_a_small_case():
    curves = {"fast": _curve(0.2), "slow": _curve(0.8), "mid": _curve(0.5, start=2.0)}
    costs = {"fast": 3, "slow": 5, "mid": 4}
    budget = 40
    ranks = allocate_ranks(curves, costs, budget, min_rank=1)
    assert sum(ranks[p] * costs[p] for p in ranks) <= budget

    def total(assign):
        return sum(curves[p][r] ** 2 for p, r in assign.items())

    best = min((dict(zip(curves, combo)) for combo in itertools.product(range(1, 9), repeat=3)
                if sum(r * costs[p] for p, r in zip(curves, combo)) <= budget), key=total)
    assert total(ranks) == pytest.approx(total(best), rel=1e-12)


def test_absolute_normalisation_follows_the_loud_linear():
    curves = {"quiet": _curve(0.5), "loud": _curve(0.6)}
    costs = {"quiet": 1, "loud": 1}
    relative = allocate_ranks(curves, costs, budget=8)
    absolute = allocate_ranks(curves, costs, budget=8, energies={"quiet": 1.0, "loud": 1e4}, normalisation="absolute")
    assert relative["quiet"] >= relative["loud"] and absolute["loud"] > relative["loud"]


def test_a_budget_below_the_floor_is_refused():
    with pytest.raises(ValueError, match="cannot give every one of 2 linears rank 1"):
        allocate_ranks({"a": _curve(0.5), "b": _curve(0.5)}, {"a": 10, "b": 10}, budget=15)
