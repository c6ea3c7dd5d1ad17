"""Divergence detection on logged training-loss curves."""

from eora_ft.train.trainer import divergence


def _curve(*losses):
    return [{"step": 5 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]


def test_nan_or_inf_is_divergence_wherever_it_appears():
    assert divergence(_curve(5.0, float("nan"), 4.0)) == "non-finite loss (nan) at step 10"
    assert "non-finite loss (inf) at step 5" == divergence(_curve(float("inf")), patience=0)


def test_losses_above_the_start_for_patience_steps():
    assert divergence(_curve(5.0, 5.1, 5.2, 5.3), patience=3) == (
        "loss above its start (5.0000) for 3 logged steps, up to step 20")
    assert divergence(_curve(5.0, 5.1, 4.9, 5.2, 5.3), patience=3) is None  # the run of 3 was broken
    assert divergence(_curve(5.0, 4.0, 3.0), patience=3) is None
    assert divergence(_curve(5.0, 6.0, 7.0, 8.0), patience=0) is None  # 0: only non-finite losses count
