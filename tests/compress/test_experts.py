"""Unfused mixture-of-experts experts: the same outputs as transformers' fused module, routing kept exactly."""

import pytest
import torch
from transformers import (GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from eora_ft.compress.experts import (ExpertLinears, expert_owners, expert_projection_names, is_expert_linear_path,
                                      is_fused_experts, unfuse_experts)

SHAPES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SHAPES, num_local_experts=4, num_experts_per_tok=2)).eval()


def qwen3_moe():
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPES, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                              decoder_sparse_step=1, mlp_only_layers=[], head_dim=16)).eval()


def gpt_oss():
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(**SHAPES, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                           layer_types=["full_attention"] * 2)).eval()
    with torch.no_grad():  # transformers leaves gpt-oss's expert tensors to the checkpoint: give them values
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.normal_(0, 0.05)
    return model


MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss}


@pytest.mark.parametrize("build", MODELS, ids=list(MODELS))
def test_unfused_experts_give_the_fused_outputs(build):
    model = MODELS[build]()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    fused = [m for m in model.modules() if is_fused_experts(m)]
    weights_before = sum(p.numel() for p in model.parameters())
    replaced = unfuse_experts(model)
    assert len(replaced) == len(fused) == 2 and not any(is_fused_experts(m) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == weights_before  # the same weights, regrouped
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertLinears) and len(experts) == experts.num_experts
    assert isinstance(getattr(experts[1], experts.up_name), torch.nn.Linear)
    assert is_expert_linear_path("model.layers.0.mlp.experts.1.up_proj") and is_expert_linear_path("mlp.experts.0.w1")
    with torch.no_grad():
        unfused = model(ids).logits
    # fp32 GEMMs over split matrices: the same sums, blocked differently
    torch.testing.assert_close(unfused, reference, rtol=1e-5, atol=1e-5)


def test_the_linears_share_the_fused_storage_and_split_it_as_transformers_does():
    model = mixtral()
    fused = model.model.layers[0].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    storage = fused.gate_up_proj.untyped_storage().data_ptr()
    unfuse_experts(model)
    expert = model.model.layers[0].mlp.experts[2]  # Mixtral's own names: w1 (gate), w3 (up), w2 (down)
    assert expert.w1.weight.untyped_storage().data_ptr() == storage  # a view: no copy of a 70B model's experts
    assert torch.equal(expert.w1.weight, gate_up[2, :96]) and torch.equal(expert.w3.weight, gate_up[2, 96:])
    assert torch.equal(expert.w2.weight, down[2])


def test_gpt_oss_interleaved_transposed_layout_and_biases():
    model = gpt_oss()
    fused = model.model.layers[0].mlp.experts
    gate_up, bias = fused.gate_up_proj.detach().clone(), fused.gate_up_proj_bias.detach().clone()
    unfuse_experts(model)
    expert = model.model.layers[0].mlp.experts[3]
    assert torch.equal(expert.gate_proj.weight, gate_up[3][:, 0::2].t()) and torch.equal(expert.gate_proj.bias, bias[3, 0::2])
    assert torch.equal(expert.up_proj.weight, gate_up[3][:, 1::2].t()) and torch.equal(expert.up_proj.bias, bias[3, 1::2])


def test_the_experts_take_the_names_of_the_models_original_checkpoints():
    assert expert_projection_names("mixtral") == ("w1", "w3", "w2")  # transformers' own conversion mapping
    assert expert_projection_names("qwen3_moe") == ("gate_proj", "up_proj", "down_proj")
    assert expert_projection_names("gpt_oss") == ("gate_proj", "up_proj", "down_proj")  # released fused: the default


def test_targets_without_an_expert_projection_keep_the_experts_fused():
    model = mixtral()
    assert unfuse_experts(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]) == []  # Mixtral: w1/w2/w3
    assert is_fused_experts(model.model.layers[0].mlp.experts)
    assert unfuse_experts(model, ["w2"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_routing_every_token_through_an_expert_leaves_the_output_unchanged_and_shows_it_every_token():
    model = qwen3_moe()
    unfuse_experts(model)
    block = model.model.layers[1].mlp
    hidden = torch.randn(30, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = block(hidden[None])
        seen = {}
        hooks = [block.experts[index].up_proj.register_forward_hook(
            lambda m, args, out, index=index: seen.__setitem__(index, seen.get(index, 0) + args[0].shape[0])) for index in (0, 5)]
        block.experts.route_all = {5}
        routed_all = block(hidden[None])
        for hook in hooks:
            hook.remove()
    # only the routed rows enter the output: the same sums over a longer batch (fp32 rounding)
    torch.testing.assert_close(routed_all, reference, rtol=1e-5, atol=1e-6)
    assert seen[5] == 30 and seen.get(0, 0) < 30  # expert 5 saw every token (in one call), expert 0 only its own


def test_unfusing_works_on_the_meta_device():
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**SHAPES, num_local_experts=4, num_experts_per_tok=2))
    unfuse_experts(model)
    owners = expert_owners(model.model.layers[0])
    assert list(owners) == ["mlp.experts"]
    assert owners["mlp.experts"][0].w2.weight.device.type == "meta"
    assert owners["mlp.experts"][0].w2.weight.shape == (64, 96)


@pytest.mark.parametrize("build", ["qwen3_moe", "mixtral"])
def test_per_expert_compressed_models_round_trip_through_every_format(tmp_path, build):
    from eora_ft.compress import make_compressor
    from eora_ft.compress.formats import import_model
    from eora_ft.compress.io import export_gptq, save_compressed
    from eora_ft.init.sequential import compress_model

    pytest.importorskip("compressed_tensors")
    from eora_ft.compress.ct_format import export_compressed_tensors

    model = MODELS[build]()
    unfuse_experts(model)
    compress_model(model, torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)),
                   make_compressor("rtn", bits=4, group_size=32, sym=True), [], progress=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    save_compressed(model, tmp_path / "eora_ft", {"method": "rtn"})
    export_gptq(model, tmp_path / "gptq")
    export_compressed_tensors(model, tmp_path / "ct")
    ours_experts = model.model.layers[1].mlp.experts
    for fmt in ("eora_ft", "gptq", "ct"):
        loaded = import_model(tmp_path / fmt)
        experts = loaded.model.layers[1].mlp.experts
        assert isinstance(experts, ExpertLinears), fmt  # the experts come back per expert
        # GPTQ stores its scales in fp16 (vLLM's kernels take fp16): weights within fp16's rounding of the scale
        tolerance = 1e-3 if fmt == "gptq" else 1e-6
        for index in range(experts.num_experts):
            for name in (experts.gate_name, experts.up_name, experts.down_name):
                torch.testing.assert_close(getattr(experts[index], name).dequantize(),
                                           getattr(ours_experts[index], name).dequantize(), rtol=tolerance, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ours, rtol=10 * tolerance, atol=10 * tolerance, msg=fmt)
