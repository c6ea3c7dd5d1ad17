"""The validation split: a seeded share of the training items, disjoint from what is trained on, in order."""

import datasets
import pytest

from eora_ft.data.validation import carve_validation


def test_a_seeded_share_is_held_out_disjoint_and_in_order():
    items = [f"item{i}" for i in range(50)]
    train, validation = carve_validation(items, 0.1, seed=3)
    assert len(validation) == 5 and len(train) == 45
    assert sorted(train + validation) == sorted(items)  # every item once: nothing trained on is validated
    assert train == sorted(train, key=items.index) and validation == sorted(validation, key=items.index)
    assert carve_validation(items, 0.1, seed=3) == (train, validation)  # the same split for every training seed
    assert carve_validation(items, 0.1, seed=4)[1] != validation


def test_a_dataset_is_split_by_rows_and_zero_keeps_everything():
    table = datasets.Dataset.from_dict({"text": [str(i) for i in range(20)]})
    train, validation = carve_validation(table, 0.25, seed=0)
    assert isinstance(validation, datasets.Dataset) and len(validation) == 5 and len(train) == 15
    assert set(train["text"]).isdisjoint(validation["text"])
    assert carve_validation(table, 0.0) == (table, None)
    assert len(carve_validation(table, 0.01)[1]) == 1  # at least one item


@pytest.mark.parametrize("count, fraction", [(1, 0.5), (3, 0.9)])
def test_nothing_left_to_train_on_is_refused(count, fraction):
    with pytest.raises(ValueError, match=rf"validation_fraction={fraction:g} of {count} training item"):
        carve_validation(list(range(count)), fraction)
