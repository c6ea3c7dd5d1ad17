"""EoRA factors per expert carried by plain PEFT LoRA on the unfused experts (issue #35 item 3): trainable through
the packed kernel, the router frozen, saved as a plain PEFT file that loads back onto the saved base."""

import json

import pytest
import torch
from safetensors.torch import load_file

from eora_ft.adapters.peft_bridge import build_lora_model, load_adapter, lora_config, save_adapter, trainable_summary
from eora_ft.compress import make_compressor
from eora_ft.compress.experts import unfuse_experts
from eora_ft.compress.io import load_compressed, save_compressed
from eora_ft.init.sequential import compress_model
from tests.compress.test_experts import MODELS, qwen3_moe

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_eora_on_every_expert_trains_and_saves_as_a_plain_peft_adapter(tmp_path):
    model = qwen3_moe()
    unfuse_experts(model, LINEARS)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    result = compress_model(model, calib, make_compressor("gptq", bits=2, group_size=32), ["eora"], rank=4,
                            target_modules=LINEARS, progress=False)
    save_compressed(model, tmp_path / "base", {"method": "gptq"})
    with torch.no_grad():
        compressed = model(ids).logits
    factors = {path: entry["eora"] for path, entry in result.factors.items()}
    assert len([p for p in factors if ".experts." in p]) == 2 * 8 * 3
    peft_model = build_lora_model(model, factors, lora_config(4, 8, 0.0, LINEARS))
    with torch.no_grad():
        compensated = peft_model(ids).logits
    # the per-expert corrections move the compressed model back toward the dense one
    assert (compensated - dense).norm() < (compressed - dense).norm()
    summary = trainable_summary(peft_model)  # raises if the router (or anything but LoRA) would train
    assert summary["trainable"] > 0
    assert not peft_model.base_model.model.model.layers[0].mlp.gate.weight.requires_grad

    peft_model.train()
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad and ".experts." in name}
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "lora_A" in name)
    # every expert's adapter has a gradient, zero where no token was routed: FSDP2 and ZeRO-3 reduce the same
    # tensors on every rank whatever each rank's tokens chose
    assert len(grads) == 2 * 8 * 3 * 2 and all(g is not None for g in grads.values())

    peft_model.eval()
    save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {"gate_proj", "up_proj", "down_proj"} <= set(config["target_modules"])
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_B.weight" in keys  # PEFT's own naming
    with torch.no_grad():
        expected = peft_model(ids).logits
        reloaded = load_adapter(load_compressed(tmp_path / "base"), tmp_path / "adapter")(ids).logits
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)

    # the Trainer's resume and load_best_model_at_end go through PeftModel.load_adapter: every expert comes back
    saved = {name: p.detach().clone() for name, p in peft_model.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    peft_model.load_adapter(str(tmp_path / "adapter"), "default", is_trainable=True)
    restored = dict(peft_model.named_parameters())
    assert all(torch.equal(restored[name], value) for name, value in saved.items())


@pytest.mark.parametrize("build", ["qwen3_moe", "mixtral"])
def test_plain_transformers_and_peft_load_the_moe_base_and_adapter_with_our_logits(tmp_path, build):
    """What a user serves with: the per-expert compressed base as a compressed-tensors checkpoint (transformers fuses
    its experts on load) and the per-expert adapter (PEFT turns it into LoRA on the fused expert tensors)."""
    pytest.importorskip("compressed_tensors")
    conversion = pytest.importorskip("peft.utils.transformers_weight_conversion")
    if not hasattr(conversion, "convert_peft_config_for_transformers"):
        pytest.skip("this PEFT does not convert per-expert adapters onto fused experts")
    from peft import AutoPeftModelForCausalLM
    from transformers import CompressedTensorsConfig

    from eora_ft.compress.ct_format import export_compressed_tensors, unrepresentable

    model = MODELS[build]()
    targets = [*LINEARS, "w1", "w2", "w3"]
    unfuse_experts(model, targets)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    result = compress_model(model, calib, make_compressor("gptq", bits=4, group_size=32, sym=True), ["eora"], rank=4,
                            target_modules=targets, progress=False)
    assert unrepresentable(model) is None
    export_compressed_tensors(model, tmp_path / "base")
    peft_model = build_lora_model(model, {p: f["eora"] for p, f in result.factors.items()},
                                  lora_config(4, 8, 0.0, targets)).eval()
    save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = AutoPeftModelForCausalLM.from_pretrained(
        tmp_path / "adapter", dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    # PEFT's LoRA on transformers' fused expert tensors, converted from our per-expert adapter
    assert type(plain.base_model.model.model.layers[0].mlp.experts).__name__ == "ParamWrapper"
    with torch.no_grad():
        ours, theirs = peft_model(ids).logits, plain(ids).logits
        with plain.disable_adapter():
            bare = plain(ids).logits
    assert (ours - bare).abs().max() > 100 * (ours - theirs).abs().max()  # the adapter matters, and it is the same
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
