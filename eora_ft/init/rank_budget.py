"""Spend one adapter parameter budget where it lowers the error most: per-linear ranks instead of one r.

Every SVD-ordered initializer (eora, act_diag, svd) gives factors whose leading ``r`` directions are its
rank-``r`` answer, so each linear's error as a function of its rank is known from one factorisation at
the largest rank allowed (:meth:`eora_ft.init.accounting.OutputError.curve`). A greedy pass then
hands out directions one at a time to the linear whose squared error drops most per parameter a
direction costs there (``N + K``), until the budget is spent. The errors are summed after
normalisation per linear:

- ``relative`` (default): ``||(dW - B A) X^T||^2 / ||W X^T||^2``, the relative output error every table
  here reports. Output energies differ by orders of magnitude between projections (a down projection's
  output is the residual update, a q projection's feeds a softmax), so absolute errors would hand the
  whole budget to the few loudest linears whatever their effect downstream; relative error treats a 1%
  error alike everywhere.
- ``absolute``: ``||(dW - B A) X^T||^2``, for the comparison (BENCHMARKS.md measures both).
"""

from __future__ import annotations

import heapq

NORMALISATIONS = ("relative", "absolute")
SVD_ORDERED = frozenset({"eora", "eora_alt", "act_diag", "svd"})


def allocate_ranks(curves: dict[str, list[float]], costs: dict[str, int], budget: int, min_rank: int = 1,
                   energies: dict[str, float] | None = None, normalisation: str = "relative") -> dict[str, int]:
    """Ranks ``{path: r}`` with ``sum(r * costs[path]) <= budget``, ``min_rank <= r <= len(curve) - 1``.

    ``curves[path][r]``: relative output error of the linear's correction truncated to rank ``r``;
    ``costs[path]``: parameters per direction (``N + K``); ``energies[path]``: ``||W X^T||^2`` (needed for
    ``absolute``). Greedy by squared-error decrease per parameter; ties go to the first path in order."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation={normalisation!r} is not valid; valid: {list(NORMALISATIONS)}")
    if normalisation == "absolute" and energies is None:
        raise ValueError("normalisation='absolute' needs the output energies of the linears")
    floor = sum(min_rank * costs[path] for path in curves)
    if budget < floor:
        raise ValueError(f"a budget of {budget} parameters cannot give every one of {len(curves)} linears rank "
                         f"{min_rank} ({floor} parameters): raise the budget or lower min_rank")
    weight = {path: (energies[path] if normalisation == "absolute" else 1.0) for path in curves}
    squared = {path: [weight[path] * e * e for e in curve] for path, curve in curves.items()}
    ranks = {path: min(min_rank, len(curve) - 1) for path, curve in squared.items()}
    spent = sum(ranks[path] * costs[path] for path in ranks)
    heap = []

    def push(order: int, path: str) -> None:
        r = ranks[path]
        if r + 1 < len(squared[path]):
            heapq.heappush(heap, (-(squared[path][r] - squared[path][r + 1]) / costs[path], order, path))

    for order, path in enumerate(curves):
        push(order, path)
    while heap:
        _, order, path = heapq.heappop(heap)
        if spent + costs[path] > budget:
            continue  # this linear no longer fits; a cheaper one may
        ranks[path] += 1
        spent += costs[path]
        push(order, path)
    return ranks
