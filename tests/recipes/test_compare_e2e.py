"""recipes/compare.py end to end at a tiny size: one folder per run, the table, the plot, the cards."""

import json

import pytest

from tests.recipes._runs import launch

pytestmark = pytest.mark.slow


def test_compare_two_inits(tmp_path):
    out = tmp_path / "cmp"
    comparison = launch("accelerate_configs/cpu.yaml", out, "--inits", "qlora", "eora", "--eval_steps", "1",
                        "--per_device_train_batch_size", "8", num_processes=1, recipe="recipes/compare.py",
                        config="recipes/configs/compare_arc_nano_gptq2.yaml")
    assert list(comparison["runs"]) == ["qlora", "eora"]
    assert comparison["base"]["arc_challenge/n"] == 24
    for init in ("qlora", "eora"):
        run = json.loads((out / init / "results.json").read_text())
        assert "base" not in run["stages"] or init == "qlora"  # the uncompressed model is evaluated once
        assert [e["step"] for e in run["eval_loss"]] == [0, 1, 2]  # eval_on_start + every step
        assert (out / init / "adapter" / "adapter_model.safetensors").exists()
        assert (out / init / "README.md").read_text().startswith("---\nlibrary_name: peft")
    # qlora starts as a no-op (B = 0): before training it scores exactly like the compressed model
    qlora = comparison["runs"]["qlora"]["stages"]
    for key, value in qlora["compressed"].items():
        assert qlora["compensated"][key] == pytest.approx(value, rel=1e-6), key
    table = (out / "results.md").read_text()
    assert "| gptq 2-bit g128 act-order | qlora |" in table and "| gptq 2-bit g128 act-order | eora |" in table
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
