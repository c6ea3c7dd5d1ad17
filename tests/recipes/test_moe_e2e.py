"""A mixture-of-experts model through a recipe end to end (issue #35): every expert compressed and adapted, the
routing counted in the summary, the adapter per expert, and the run's files loading back with the run's logits."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes._runs import launch

pytestmark = pytest.mark.slow

NANO = "eora_ft/assets/models/nano-llama-5m"


def _tiny_qwen3_moe(directory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
                            max_position_embeddings=1024, tie_word_embeddings=True)
    Qwen3MoeForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the nano model's tokenizer: 8192 tokens
        shutil.copy(f"{NANO}/{name}", directory / name)


def test_the_text_recipe_compresses_and_adapts_every_expert(tmp_path):
    from eora_ft.adapters import load_pretrained

    model_dir = tmp_path / "qwen3moe"
    _tiny_qwen3_moe(model_dir)
    out = tmp_path / "run"
    results = launch("accelerate_configs/cpu.yaml", out, "--model_name_or_path", str(model_dir), "--group_size", "64",
                     "--per_device_train_batch_size", "4", "--eval_limit", "1", "--eval_base", "false",
                     "--cache_dir", str(tmp_path / "cache"), num_processes=1, recipe="recipes/text.py",
                     config="recipes/configs/text_nano_gptq2_eora.yaml")
    summary = results["summary"]
    router = 2 * 8 * 64
    total = 2 * (64 * 64 * 2 + 32 * 64 * 2) + 2 * 8 * 3 * 64 * 64 + router
    assert summary["decoder weights compressed"] == f"{1 - router / total:.1%} (dense: mlp.gate.weight {router / total:.1%})"
    assert summary["compressor calibration, experts"].endswith("of 16 experts calibrated on every token")
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    experts = {key.split(".experts.")[1].split(".")[0] for key in keys if ".experts." in key}
    assert experts == {str(e) for e in range(8)}  # an adapter on every expert
    stages = results["stages"]
    assert list(stages) == ["compressed", "compensated", "finetuned"]
    reloaded = load_pretrained(str(out / "adapter"))  # the exported base unfuses its experts to take the adapter
    assert type(reloaded.base_model.model.model.layers[0].mlp.experts).__name__ == "ExpertLinears"
