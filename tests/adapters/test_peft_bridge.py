"""PEFT LoRA over CompressedLinear: factors load exactly, alpha != r is divided out, files reload in plain PEFT."""

import copy

import pytest
import torch
from peft import PeftModel

from eora_ft.compress import CompressedLinear, make_compressor
from eora_ft.compress.linear import dequantize_model
from eora_ft.init.sequential import compress_model
from eora_ft.adapters.peft_bridge import build_lora_model, lora_config, trainable_summary

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def compressed(nano_model_and_tokenizer):
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = torch.randint(1, 8192, (4, 64), generator=torch.Generator().manual_seed(0))
    result = compress_model(model, ids, make_compressor("gptq", bits=2, group_size=128), ["eora"], rank=8,
                            target_modules=LINEARS, batch_size=2, progress=False)
    return model, {p: f["eora"] for p, f in result.factors.items()}, ids[:2]


def _peft(compressed, r=8, alpha=8):
    model, factors, _ = compressed
    return build_lora_model(copy.deepcopy(model), factors, lora_config(r, alpha, 0.0, LINEARS))


def test_adapter_holds_exactly_the_factors(compressed):
    _, factors, _ = compressed
    peft_model = _peft(compressed)
    path = "model.layers.1.mlp.down_proj"
    module = peft_model.base_model.model.get_submodule(path)
    assert isinstance(module.base_layer, CompressedLinear)
    assert torch.allclose(module.get_delta_weight("default"), factors[path].delta(), atol=1e-6)


def test_alpha_different_from_r_gives_the_same_correction(compressed):
    _, _, ids = compressed
    with torch.no_grad():
        same = _peft(compressed, alpha=8)(input_ids=ids).logits
        other = _peft(compressed, alpha=32)(input_ids=ids).logits
    assert torch.allclose(same, other, atol=1e-4)


def test_only_adapters_train(compressed):
    peft_model = _peft(compressed)
    counts = trainable_summary(peft_model)
    assert counts["trainable"] == 4 * 8 * sum([256 + 256, 256 + 128, 256 + 128, 256 + 256, 256 + 768, 256 + 768, 768 + 256])
    peft_model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="only LoRA adapters may train"):
        trainable_summary(peft_model)


def test_merge_is_refused(compressed):
    with pytest.raises(RuntimeError, match="re-quantize"):
        _peft(compressed).merge_and_unload()


def test_saved_adapter_reloads_in_plain_peft_over_dequantized_base(compressed, tmp_path):
    model, _, ids = compressed
    peft_model = _peft(compressed, alpha=16)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    dense = dequantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, CompressedLinear) for m in dense.modules())
    reloaded = PeftModel.from_pretrained(dense, tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    # identical math in a different op order (dequantize-then-matmul vs stored dense weight): fp32 round-off only
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


# bitsandbytes' CPU 4-bit matmul depends on the CPU: with AVX-512 BF16 it rounds the input and the block
# absmax to bf16 and returns a bf16 result (bitsandbytes/backends/cpu/ops.py, gemv_4bit); elsewhere it
# dequantizes to fp32. Unit roundoff of bf16 (8 significant bits).
BF16_UNIT_ROUNDOFF = 2.0**-8


def test_nf4_base_gets_peft_bnb_lora_with_the_factors(nano_model_and_tokenizer):
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(1))
    result = compress_model(model, ids, make_compressor("nf4"), ["eora"], rank=4, target_modules=LINEARS, progress=False)
    peft_model = build_lora_model(model, {p: f["eora"] for p, f in result.factors.items()}, lora_config(4, 8, 0.0, LINEARS))
    module = peft_model.base_model.model.get_submodule("model.layers.0.mlp.up_proj")
    assert type(module.base_layer).__name__ == "NF4Linear"
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    factors = result.factors["model.layers.0.mlp.up_proj"]["eora"]
    weight = module.base_layer.dequantize(torch.float32)
    with torch.no_grad():
        got, got_base = module(x), module.base_layer(x)
    # The base through bitsandbytes, bounded for its lowest-precision path (bf16): x and absmax rounded
    # and their product with the NF4 code (one roundoff each per product), the output rounded once.
    base = x @ weight.t()
    base_tolerance = 3 * BF16_UNIT_ROUNDOFF * (x.abs() @ weight.abs().t()) + BF16_UNIT_ROUNDOFF * base.abs()
    assert torch.all((got_base - base).abs() <= base_tolerance)
    # The adapter's term is PEFT's, added in fp32 on top of that output: exactly the factors' correction.
    assert torch.allclose(got - got_base, x @ factors.delta().t(), rtol=1e-5, atol=1e-5 * float(got.abs().max()))
    assert trainable_summary(peft_model)["trainable"] > 0


def test_rank_pattern_and_alpha_pattern_for_rank_deficient_layers(compressed, tmp_path):
    model, factors, ids = compressed
    factors = dict(factors)
    path = "model.layers.0.self_attn.v_proj"
    f = factors[path]
    factors[path] = type(f)(f.a.clone(), f.b.clone(), 3)
    factors[path].a[3:] = 0
    factors[path].b[:, 3:] = 0
    peft_model = build_lora_model(copy.deepcopy(model), factors, lora_config(8, 16, 0.0, LINEARS),
                                  trim_to_effective_rank=True)
    module = peft_model.base_model.model.get_submodule(path)
    assert module.r["default"] == 3 and module.scaling["default"] == pytest.approx(2.0)
    assert torch.allclose(module.get_delta_weight("default"), factors[path].delta(), atol=1e-6)
    peft_model.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"].values()) == [3] and list(saved["alpha_pattern"].values()) == [6.0]
    reloaded = PeftModel.from_pretrained(dequantize_model(copy.deepcopy(model)), tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_save_adapter_replaces_only_an_adapter_directory(compressed, tmp_path):
    from eora_ft.adapters.peft_bridge import save_adapter

    peft_model = _peft(compressed)
    target = tmp_path / "adapter"
    save_adapter(peft_model, target, "base")
    save_adapter(peft_model, target, "base")  # a previous adapter is replaced whole
    assert (target / "adapter_model.safetensors").exists()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        save_adapter(peft_model, precious, "base")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "notes"]  # no temp dirs left behind


def test_all_linear_adapts_every_compressed_linear_and_saves_their_names(nano_model_and_tokenizer, tmp_path):
    import json

    from eora_ft.config import parse_recipe_args
    from eora_ft.adapters.peft_bridge import save_adapter

    model_args = parse_recipe_args(["--lora_target_modules", "all-linear", "--output_dir", str(tmp_path / "o"),
                                    "--report_to", "none"])[4]
    assert model_args.lora_target_modules is None  # every linear of the decoder layers, as compression reads it
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = torch.randint(1, 8192, (1, 32), generator=torch.Generator().manual_seed(0))
    result = compress_model(model, ids, make_compressor("rtn", bits=4, group_size=64), ["eora"], rank=4,
                            target_modules=None, progress=False)
    peft_model = build_lora_model(model, {p: f["eora"] for p, f in result.factors.items()},
                                  lora_config(4, 8, 0.0, model_args.lora_target_modules))
    adapted = {n.removesuffix(".lora_A") for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == len(result.factors) == 28  # PEFT's own all-linear would find no nn.Linear here
    save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == sorted(LINEARS) and "lm_head" not in saved


def _tiny(arch: str):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),  # q/k/v with bias
        "mistral": lambda: transformers.MistralConfig(**common),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=32),
        "phi3": lambda: transformers.Phi3Config(**common, pad_token_id=0),  # fused qkv_proj, gate_up_proj
        "opt": lambda: transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                              num_attention_heads=2, word_embed_proj_dim=64),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch]())


@pytest.mark.parametrize("arch,names", [
    ("llama", LINEARS), ("qwen2", LINEARS), ("mistral", LINEARS), ("gemma2", LINEARS),
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("opt", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
])
def test_all_linear_on_each_architecture_adapts_every_decoder_linear_and_never_the_head(arch, names):
    model = _tiny(arch)
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    result = compress_model(model, ids, make_compressor("rtn", bits=4, group_size=-1), ["eora"], rank=4,
                            target_modules=None, progress=False)
    peft_model = build_lora_model(model, {p: f["eora"] for p, f in result.factors.items()}, lora_config(4, 8, 0.0, None))
    adapted = {n.removesuffix(".lora_A") for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert adapted == {f"base_model.model.{path}" for path in result.factors}
    assert {path.split(".")[-1] for path in result.factors} == set(names) and len(result.factors) == 2 * len(names)
    assert not any("lm_head" in n for n in adapted)
    with torch.no_grad():
        assert torch.isfinite(peft_model(ids).logits).all()


def test_gpt2_conv1d_layers_get_an_error_that_names_them():
    with pytest.raises(ValueError, match=r"Conv1D layers \['c_attn', 'c_fc', 'c_proj'\] \(GPT-2 style"):
        compress_model(_tiny("gpt2"), torch.randint(1, 128, (1, 8)), make_compressor("rtn", bits=4, group_size=-1),
                       ["eora"], rank=4, target_modules=None, progress=False)
