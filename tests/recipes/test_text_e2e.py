"""recipes/text.py (language-model recovery) end to end at a tiny size, after an ARC run on the same model:
the second task finds the compressed base in the cache and only builds its own adapter."""

import math

import pytest

from tests.recipes._runs import launch

pytestmark = pytest.mark.slow


def test_text_recipe_reuses_the_arc_runs_base_and_reports_held_out_perplexity(tmp_path):
    cache = str(tmp_path / "cache")
    arc = launch("accelerate_configs/cpu.yaml", tmp_path / "arc", "--per_device_train_batch_size", "8",
                 "--cache_dir", cache, num_processes=1)
    text = launch("accelerate_configs/cpu.yaml", tmp_path / "text", "--per_device_train_batch_size", "4",
                  "--eval_limit", "1", "--cache_dir", cache, num_processes=1, recipe="recipes/text.py",
                  config="recipes/configs/text_nano_gptq2_eora.yaml")
    assert arc["summary"]["artifact cache"] == "base: built, init: built"
    assert text["summary"]["artifact cache"] == "base: hit, init: built"
    assert text["summary"]["compressed base"] == arc["summary"]["compressed base"]
    assert [m[0] for m in text["metrics"]] == ["enwiki_heldout/ppl", "c4_heldout/ppl", "wikitext2/ppl"]
    stages = text["stages"]
    assert list(stages) == ["base", "compressed", "compensated", "finetuned"]
    # held-out Wikipedia is the model's own kind of text: its perplexity is the lowest of the three
    for metrics in stages.values():
        assert metrics["enwiki_heldout/ppl"] < metrics["c4_heldout/ppl"] < metrics["wikitext2/ppl"]
    assert stages["compensated"]["enwiki_heldout/ppl"] < stages["compressed"]["enwiki_heldout/ppl"]
    assert text["divergence"] is None and all(math.isfinite(p["loss"]) for p in text["train_loss"])
    table = (tmp_path / "text" / "results.md").read_text()
    assert "| stage | enwiki held-out ppl | C4 held-out ppl | WikiText-2 ppl |" in table
