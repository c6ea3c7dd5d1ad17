"""recipes/compare.py end to end at a tiny size: one folder per run and seed, the ceiling row, the table with
mean ± std, the plot with seed bands, the cards; every run shares one compressed base."""

import json

import pytest

from tests.recipes._runs import launch

pytestmark = pytest.mark.slow


def test_compare_two_inits_two_seeds_and_the_ceiling(tmp_path):
    out = tmp_path / "cmp"
    comparison = launch("accelerate_configs/cpu.yaml", out, "--inits", "qlora", "eora", "--seeds", "0", "1",
                        "--ceiling", "true", "--eval_steps", "1", "--per_device_train_batch_size", "8",
                        "--cache_dir", str(tmp_path / "cache"), num_processes=1, recipe="recipes/compare.py",
                        config="recipes/configs/compare_arc_nano_gptq2.yaml")
    assert comparison["groups"] == {"lora": ["lora_seed0", "lora_seed1"], "qlora": ["qlora_seed0", "qlora_seed1"],
                                    "eora": ["eora_seed0", "eora_seed1"]}
    assert comparison["base"]["arc_challenge/n"] == 24
    caches = {label: run["summary"]["artifact cache"] for label, run in comparison["runs"].items()}
    # one compressed base for every compressed run; eora's adapter does not depend on the seed, qlora's does
    assert caches["qlora_seed0"] == "base: built, init: built" and caches["qlora_seed1"] == "base: hit, init: built"
    assert caches["eora_seed0"] == "base: hit, init: built" and caches["eora_seed1"] == "base: hit, init: hit"
    for label in comparison["runs"]:
        run = json.loads((out / label / "results.json").read_text())
        assert "base" not in run["stages"] or label == "lora_seed0"  # the uncompressed model is evaluated once
        assert [e["step"] for e in run["eval_loss"]] == [0, 1, 2]  # eval_on_start + every step
        assert (out / label / "adapter" / "adapter_model.safetensors").exists()
        assert (out / label / "README.md").read_text().startswith("---\nlibrary_name: peft")
    # the ceiling trains plain LoRA on the uncompressed model: before training it is that model exactly
    ceiling = comparison["runs"]["lora_seed0"]
    assert ceiling["summary"]["compression"] == "none (uncompressed)"
    for key, value in comparison["base"].items():
        assert ceiling["stages"]["compensated"][key] == pytest.approx(value, rel=1e-6), key
    # each compressed base is evaluated once: the first run on it scores it, the others reuse that row (the
    # ceiling's "compressed" model is the uncompressed one, a base of its own)
    assert comparison["_log"].count("compressed model: scored by an earlier run on the same base") == 4
    compressed = [run["stages"]["compressed"] for label, run in comparison["runs"].items() if label[:4] != "lora"]
    assert all(row == compressed[0] for row in compressed)
    assert comparison["runs"]["lora_seed1"]["stages"]["compressed"] == ceiling["stages"]["compressed"]
    # qlora starts as a no-op (B = 0): before training it scores exactly like the compressed model (measured by
    # seed 0's run; seed 1's compensated row is measured on its own load of the base)
    qlora = comparison["runs"]["qlora_seed1"]["stages"]
    for key, value in qlora["compressed"].items():
        assert qlora["compensated"][key] == pytest.approx(value, rel=1e-6), key
    table = (out / "results.md").read_text()
    for row in ("| none (uncompressed) | lora | 0.001 | 2 |", "| gptq 2-bit g128 act-order | qlora | 0.001 | 2 |",
                "| gptq 2-bit g128 act-order | eora | 0.001 | 2 |"):
        assert row in table
    assert "steps to qlora's eval loss" in table and "Mean ± sample std over 2 seeds" in table
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_rates_and_steps_are_chosen_on_a_validation_split_of_the_training_data(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "cmp"
    comparison = launch("accelerate_configs/cpu.yaml", out, "--inits", "eora", "--seeds", "0",
                        "--ceiling", "false", "--learning_rates", "1e-4", "0.05", "--grid_extensions", "1",
                        "--validation_fraction", "0.25",
                        "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                        "--load_best_model_at_end", "true", "--per_device_train_batch_size", "8",
                        "--cache_dir", str(tmp_path / "cache"), num_processes=1, recipe="recipes/compare.py",
                        config="recipes/configs/compare_arc_nano_gptq2.yaml")
    # 0.05 diverges, so eora chose 1e-4, the low edge: the grid was extended one step below (1e-4^2 / 0.05); the
    # choice per init among several is tests/run/test_compare.py's
    assert sorted(comparison["groups"]) == ["eora_lr0.0001", "eora_lr0.05", "eora_lr2e-07"]
    for label, run in comparison["runs"].items():
        # 64 training items: 16 held out, never trained on; the 24 evaluation items are the reported ones
        assert run["summary"]["train items"] == 48 and run["summary"]["eval items"] == 24
        assert run["summary"]["eval loss on"] == "validation: 16 training items held out (seed 0)"
        curve = {point["step"]: point["loss"] for point in run["eval_loss"]}
        assert sorted(curve) == [0, 1, 2]
        best = run["best"]  # the lowest validation loss, the initial adapter (step 0) included
        assert best["eval_loss"] == pytest.approx(min(curve.values())) and curve[best["step"]] == best["eval_loss"]
        # the saved adapter is the one at that step: the initial adapter, or the checkpoint the Trainer kept
        saved = load_file(out / label / "adapter" / "adapter_model.safetensors")
        at_best = load_file(out / label / f"checkpoint-{best['step']}" / "adapter_model.safetensors")
        assert saved.keys() == at_best.keys() and all(saved[k].equal(at_best[k]) for k in saved)
    losses = {label: run["best"]["eval_loss"] for label, run in comparison["runs"].items()}
    table = (out / "results.md").read_text()
    sweep = table.split("## Learning rates, chosen on validation")[1]
    rates = {"2e-07": "eora_lr2e-07", "0.0001": "eora_lr0.0001", "0.05": "eora_lr0.05"}
    rate = min(rates, key=lambda r: losses[rates[r]])
    assert "| gptq 2-bit g128 act-order | eora | " + rate + " | 1 |" in table
    assert "| eora | " in sweep and f"**{losses[rates[rate]]:.4f}**" in sweep
