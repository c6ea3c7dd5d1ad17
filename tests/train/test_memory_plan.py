"""The training memory plan: what each process layout shards, the 70B case the GPU read found, the warning."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from eora_ft.train.memory_plan import (ModelSizes, check_training_memory, layout_of, llama_sizes, sizes_of,
                                       training_memory)

LLAMA_70B = dict(hidden=8192, kv_dim=1024, intermediate=28672, layers=80, vocab=128256)
H100 = 80 * 2**30


def test_the_layouts_shard_what_they_claim():
    sizes = ModelSizes(base_bytes=10**10, trainable=10**8, layers=32, hidden=4096, intermediate=14336, vocab=128256)
    tokens = 4 * 1024
    ddp, zero2, zero3 = (training_memory(sizes, layout, 8, tokens) for layout in ("ddp", "zero2", "zero3"))
    assert ddp["base"] == zero2["base"] == zero3["base"] == 10.0  # buffers: replicated under every layout
    assert ddp["adapter"] == zero2["adapter"] == 0.4 and zero3["adapter"] == pytest.approx(0.05)
    assert ddp["gradients"] == 0.4 and zero2["gradients"] == zero3["gradients"] == pytest.approx(0.05)
    assert ddp["optimizer"] == 0.8 and zero2["optimizer"] == pytest.approx(0.1)
    assert ddp["total"] > zero2["total"] > zero3["total"]
    one = [training_memory(sizes, layout, 1, tokens)["total"] for layout in ("ddp", "zero2", "zero3")]
    assert one[0] == pytest.approx(one[1]) == pytest.approx(one[2])  # nothing to shard over
    assert training_memory(sizes, "ddp", 8, tokens, checkpointing=False)["activations"] > 4 * ddp["activations"]
    with pytest.raises(ValueError, match="layout='fsdp'"):
        training_memory(sizes, "fsdp", 8, tokens)


def test_fsdp2_keeps_a_shard_of_the_base_plus_what_is_gathered_at_once():
    sizes = ModelSizes(base_bytes=10**10, trainable=10**8, layers=32, hidden=4096, intermediate=14336, vocab=128256)
    zero3, fsdp2 = (training_memory(sizes, layout, 8, 4 * 1024) for layout in ("zero3", "fsdp2"))
    head = 128256 * 4096 * 2
    layer = (10**10 - 2 * head) / 32
    assert fsdp2["base"] == pytest.approx((10**10 / 8 + 3 * layer + head) / 1e9)
    assert (fsdp2["adapter"], fsdp2["gradients"], fsdp2["optimizer"]) == \
        pytest.approx((zero3["adapter"], zero3["gradients"], zero3["optimizer"]))
    # the case: a 70B 4-bit base does not train on 24 GB cards replicated, and does sharded over 8
    seventy = llama_sizes(**LLAMA_70B, bits=4, group_size=128, rank=16)
    ddp, sharded = (training_memory(seventy, layout, 8, 4 * 1024) for layout in ("ddp", "fsdp2"))
    assert ddp["base"] > 24 and ddp["total"] > 24
    assert sharded["base"] < ddp["base"] / 4 and sharded["total"] < 0.9 * 24 * 2**30 / 1e9


def test_70b_rank_128_under_ddp_is_refused_by_the_plan_with_what_fits(caplog):
    sizes = llama_sizes(**LLAMA_70B, bits=4, group_size=128, rank=128)
    assert sizes.trainable == pytest.approx(1.66e9, rel=0.01)  # the count
    assert 36 < sizes.base_bytes / 1e9 < 42  # 4-bit codes of 68.5 B decoder weights, scales, bf16 embeddings
    with caplog.at_level(logging.INFO, logger="eora_ft.train.memory_plan"):
        plan = check_training_memory(sizes, "ddp", 8, 8 * 1024, True, H100, lora_r=128)
    assert plan["total"] > 0.9 * H100 / 1e9
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "zero2" in warning[0] and "lora_r 64 fits" in warning[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eora_ft.train.memory_plan"):
        check_training_memory(llama_sizes(**LLAMA_70B, bits=4, group_size=128, rank=16), "ddp", 8, 4 * 1024, True,
                              H100, lora_r=16)
    assert not caplog.records  # rank 16 fits: no warning


def test_sizes_of_a_peft_model_count_the_adapters_as_trainable():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    sizes = sizes_of(model, dtype_bytes=4)
    assert sizes.trainable == 2 * 4 * ((64 + 64) + (96 + 64))
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert sizes.base_bytes == frozen + sum(b.numel() * b.element_size() for b in model.buffers())  # + rotary
    assert (sizes.layers, sizes.hidden, sizes.intermediate, sizes.vocab) == (2, 64, 96, 128)


def test_layout_of_reads_deepspeeds_stage(monkeypatch):
    class Args:
        hf_deepspeed_config = None

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert layout_of(Args()) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert layout_of(Args()) == "zero3"

    class Config:
        config = {"zero_optimization": {"stage": 2}}

    Args.hf_deepspeed_config = Config()
    assert layout_of(Args()) == "zero2"


def test_layout_of_reads_an_fsdp2_launch(monkeypatch):
    class Args:
        hf_deepspeed_config = None

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert layout_of(Args()) == "fsdp2"
