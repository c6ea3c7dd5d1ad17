"""The comparison table has the paper's shape and the loss plot is written; arguments are checked."""

import pytest

from eora_ft.compare import CompareArguments, comparison_markdown, write_comparison
from eora_ft.report import model_card

METRICS = [["arc_challenge/acc", "ARC-C acc", "pct"], ["wikitext2/ppl", "WikiText-2 ppl", "ppl"]]


def _run(init, before, after, lr=2e-4, compressed=(0.25, 500.0)):
    stage = lambda acc, ppl: {"arc_challenge/acc": acc, "wikitext2/ppl": ppl}  # noqa: E731
    return {"metrics": METRICS, "task": "arc_challenge",
            "stages": {"compressed": stage(*compressed), "compensated": stage(*before), "finetuned": stage(*after)},
            "summary": {"compression": "gptq 2-bit g128", "train steps": 10, "train items": 64, "eval items": 16,
                        "calibration tokens": 1024, "model": "nano", "artifact cache": "hit: /c/k"},
            "config": {"AdapterInitArguments": {"init_method": init}, "SFTConfig": {"learning_rate": lr},
                       "CompressionArguments": {"compress_method": "gptq"}},
            "train_loss": [{"step": 5, "loss": 6.0}, {"step": 10, "loss": 5.5}],
            "eval_loss": [{"step": 0, "loss": 6.2}, {"step": 10, "loss": 5.9}]}


def test_table_rows_are_compression_x_init_with_before_and_after(tmp_path):
    comparison = {"title": "t", "base": {"arc_challenge/acc": 0.3, "wikitext2/ppl": 400.0},
                  "runs": {"loftq": _run("loftq", (0.26, 480.0), (0.27, 470.0), compressed=(0.2, 490.0)),
                           "eora": _run("eora", (0.28, 450.0), (0.30, 440.0))}}
    text = comparison_markdown(comparison)
    lines = text.splitlines()
    assert lines[2].startswith("| compression | init | lr | ARC-C acc before | ARC-C acc after | WikiText-2 ppl before")
    assert "| none (uncompressed) | – | – | 30.00 | – | 400.00 | – | – |" in lines
    # the no-adapter row comes from a plain run, not LoftQ's re-compressed base
    assert "| gptq 2-bit g128 | none (no adapter) | – | 25.00 | – | 500.00 | – | – |" in lines
    assert "| gptq 2-bit g128 | eora | 0.0002 | 28.00 | 30.00 | 450.00 | 440.00 | 5.5000 |" in lines
    write_comparison(tmp_path, comparison)
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "README.md").read_text() == text
    from eora_ft.report import default_file_mode

    for name in ("loss_curves.png", "results.json", "results.md"):  # temp files are 0600; outputs must not be
        assert (tmp_path / name).stat().st_mode & 0o777 == default_file_mode()


def test_model_card_has_metadata_results_and_usage():
    card = model_card({**_run("eora", (0.28, 450.0), (0.30, 440.0)), "title": "arc: x"})
    assert card.startswith("---\nlibrary_name: peft\nbase_model: nano\ntags: [eora_ft, lora, gptq, eora, arc_challenge]")
    assert "| finetuned | 30.00 | 440.00 |" in card
    assert 'load_compressed("/c/k/base")' in card and "Training loss: 6.0000 at step 5 -> 5.5000 at step 10" in card


@pytest.mark.parametrize("kwargs,match", [
    ({"inits": ["eora", "pissa"]}, r"unknown: \['pissa'\]"),
    ({"inits": []}, "non-empty"),
    ({"inits": ["eora", "eora"]}, "repeats"),
    ({"learning_rates": [1e-4, 0.0]}, "must be positive"),
])
def test_bad_compare_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompareArguments(**kwargs)
