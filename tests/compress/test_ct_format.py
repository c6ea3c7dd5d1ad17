"""compressed-tensors pack-quantized: what we write is what the library reads, bit for bit, and loads in
plain transformers with our logits; what llm-compressor writes imports with its logits."""

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from eora_ft.cli import main
from eora_ft.compress.ct_format import export_compressed_tensors, import_compressed_tensors
from eora_ft.compress.formats import detect_format, import_model
from eora_ft.compress.io import _compressed_layers, export_gptq, save_compressed
from eora_ft.compress.linear import CompressedLinear, set_module

NANO = "eora_ft/assets/models/nano-llama-5m"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llmcompressor_w4a16_asym_actorder_g32"
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_grid_model(bits: int, group_size: int, symmetric: bool, regrouped: bool, dtype=torch.bfloat16):
    """A 1-layer Llama whose 7 linears are CompressedLinear with random codes, scales and zero points."""
    torch.manual_seed(bits * 100 + group_size)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).to(dtype)
    for name, linear in list(model.model.layers[0].named_modules()):
        if name.split(".")[-1] not in LINEARS:
            continue
        n, k = linear.weight.shape
        group = k if group_size == -1 else group_size
        codes = torch.randint(0, 2**bits, (k, n))
        zeros = torch.full((k // group, n), 2 ** (bits - 1)) if symmetric else torch.randint(0, 2**bits, (k // group, n))
        scales = torch.rand(k // group, n) * 0.01 + 1e-3
        g_idx = torch.randperm(k) // group if regrouped else None
        set_module(model.model.layers[0], name, CompressedLinear.from_codes(codes, scales, zeros, bits, group_size,
                                                                            g_idx, dtype=dtype))
    return model


GRIDS = [(bits, group, sym) for bits in (2, 3, 4, 8) for group in (-1, 32) for sym in (True, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", GRIDS)
def test_every_grid_is_what_the_library_reads_and_round_trips_exactly(tmp_path, bits, group_size, symmetric):
    regrouped = False  # our GPTQ keeps static groups; regrouped inputs only come from imported checkpoints
    model = _random_grid_model(bits, group_size, symmetric, regrouped)
    export_compressed_tensors(model, tmp_path / "ct")
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "pack-quantized" and quant["quant_method"] == "compressed-tensors"
    assert "lm_head" in quant["ignore"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (bits, symmetric)
    assert weights["strategy"] == ("channel" if group_size == -1 else "group")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    back = import_compressed_tensors(tmp_path / "ct", dtype=torch.bfloat16)
    for path, layer in _compressed_layers(model).items():
        state = {key[len(path) + 1:]: value for key, value in tensors.items() if key.startswith(path + ".")}
        assert ("weight_zero_point" in state) is not symmetric and ("weight_g_idx" in state) is regrouped
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"], layer.dequantize())
        assert torch.equal(back.get_submodule(path).dequantize(), layer.dequantize())


@pytest.mark.parametrize("method,options", [("rtn", ["--bits", "4", "--group_size", "64", "--sym"]),
                                            ("gptq", ["--bits", "8", "--group_size", "-1", "--sym"])])
def test_cli_export_loads_in_plain_transformers_with_our_logits(tmp_path, method, options):
    out = tmp_path / "ct"
    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", method, *options, "--calib_num_samples", "2",
                 "--calib_seq_len", "64", "--format", "compressed-tensors", "--output_dir", str(out)]) == 0
    ours = import_model(out)
    theirs = AutoModelForCausalLM.from_pretrained(out)  # compressed-tensors' own loader, via transformers
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ != "CompressedLinear"
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_each_format_is_detected_and_an_unknown_directory_is_named(tmp_path):
    model = _random_grid_model(4, 32, False, False)  # bf16 scales: exact in GPTQ's fp16 scales too
    save_compressed(model, tmp_path / "ours", {"method": "rtn"})
    export_gptq(model, tmp_path / "gptq", checkpoint_format="gptq_v2")
    export_compressed_tensors(model, tmp_path / "ct")
    reference = [layer.dequantize(torch.float32) for layer in _compressed_layers(model).values()]
    for name, expected in [("ours", "eora_ft"), ("gptq", "gptq"), ("ct", "compressed-tensors")]:
        assert detect_format(tmp_path / name) == expected
        loaded = import_model(tmp_path / name)
        assert all(torch.equal(a.dequantize(), b) for a, b in zip(_compressed_layers(loaded).values(), reference))
    AutoModelForCausalLM.from_pretrained(NANO).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain is not a compressed checkpoint eora_ft reads.*quant_method=None"):
        detect_format(tmp_path / "plain")


def test_regrouped_inputs_are_refused_where_the_library_dropped_them(tmp_path):
    import compressed_tensors

    model = _random_grid_model(4, 32, False, True)
    if tuple(int(p) for p in compressed_tensors.__version__.split(".")[:2]) < (0, 20):
        pytest.skip("this compressed-tensors still stores actorder='group'")
    with pytest.raises(ValueError, match=r"regroup their inputs .* export with --format gptq or eora_ft"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_a_pruned_only_model_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="format='compressed-tensors' holds integer codes only"):
        main(["compress", "--model_name_or_path", NANO, "--compress_method", "sparsegpt", "--calib_num_samples", "2",
              "--calib_seq_len", "64", "--format", "compressed-tensors", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_llm_compressor_wrote_imports_with_its_logits():
    """tests/fixtures/make_llmcompressor_fixture.py made it (llm-compressor 0.14.0.1's GPTQ, W4 asymmetric g32,
    actorder weight) and recorded the quantized model's logits before saving."""
    reference = load_file(str(FIXTURE / "reference_logits.safetensors"))
    model = import_model(FIXTURE, dtype=torch.bfloat16)
    layers = _compressed_layers(model)
    assert len(layers) == 14 and {(m.bits, m.group_size) for m in layers.values()} == {(4, 32)}
    assert any(bool((m.zeros != 8).any()) for m in layers.values())  # asymmetric zero points made it through
    quant = json.loads((FIXTURE / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**quant["config_groups"]["group_0"]["weights"]))
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    for path, layer in layers.items():  # the library's own reader agrees with ours, bit for bit
        state = {key[len(path) + 1:]: value for key, value in tensors.items() if key.startswith(path + ".")}
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"], layer.dequantize())
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits.float()
    # The weights are equal bit for bit (above); the logits, computed in bf16, differ by one bf16 unit at 0.5
    # here (0.0039: another process, other kernels) and may by a few more on CPUs with other bf16 paths
    # (AVX-512 BF16, AMX). A wrong layout would be off by the logits' spread.
    expected = reference["logits"]
    tolerance = 2**-6 * float(expected.abs().max())
    assert tolerance < float(expected.std()) / 10  # far below what a wrong layout would be off by
    assert float((logits - expected).abs().max()) <= tolerance
