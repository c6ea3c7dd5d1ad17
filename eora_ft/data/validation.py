"""A validation split carved from the training items: what the step and the learning rate are chosen on.

The evaluation items are what the results report; choosing a checkpoint or a rate on them would report the
test set's own optimum. A seeded share of the training items is held out instead (never trained on), the
same share for every training seed and every learning rate of a comparison, so their choices are made on
one set.
"""

from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

Items = TypeVar("Items", bound=Sequence)


def carve_validation(items: Items, fraction: float, seed: int = 0) -> tuple[Items, Items | None]:
    """``(training items, validation items)``: a seeded ``fraction`` of ``items`` (a list, or a
    ``datasets.Dataset``) held out, at least one item, at least one left to train on; ``(items, None)`` when
    ``fraction`` is 0. Both keep the items' original order. Raises ``ValueError`` naming the counts when
    ``items`` cannot be split."""
    if fraction <= 0:
        return items, None
    count = len(items)
    held = max(1, math.floor(count * fraction + 0.5))
    if count < 2 or held >= count:
        raise ValueError(f"validation_fraction={fraction:g} of {count} training item(s) leaves nothing to train on: "
                         "give more training items (train_limit) or a smaller validation_fraction")
    chosen = set(random.Random(seed).sample(range(count), held))
    keep = [i for i in range(count) if i not in chosen]
    picked = sorted(chosen)
    if hasattr(items, "select"):  # a datasets.Dataset
        return items.select(keep), items.select(picked)
    return [items[i] for i in keep], [items[i] for i in picked]
