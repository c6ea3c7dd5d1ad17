"""Saving/loading compressed models and GPTQ checkpoint export/import: exact round trips, layout, atomicity."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from eora_ft.compress import RTN, ActivationStats, CompressedLinear, SparseWeight, make_compressor
from eora_ft.compress import io as cio
from eora_ft.compress.gptq_format import gptq_tensors, layer_from_gptq, pack_gptq, unpack_gptq
from eora_ft.compress.io import export_gptq, import_gptq, load_compressed, save_compressed
from eora_ft.init.sequential import compress_model
from eora_ft.kernels.packing import pack_codes, unpack_codes

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # these models are tiny: one thread is fastest, and a 2-thread pool stalls badly on a shared, busy CPU
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _ids(n=2, length=16, vocab=128, seed=0):
    return torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _tiny_model(bits=4, group_size=32, sym=False, seed=0):
    """A random 2-layer Llama (hidden 64, MLP 128, tied embeddings), every decoder linear RTN-quantized."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    compress_model(model, _ids(), make_compressor("rtn", bits=bits, group_size=group_size, sym=sym), [],
                   target_modules=LINEARS, progress=False)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _layers(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, CompressedLinear)}


def _with_fp16_scales(model):
    rounded = copy.deepcopy(model)
    for layer in _layers(rounded).values():
        layer.scales.copy_(layer.scales.half().float())
    return rounded


@pytest.fixture(scope="module")
def compressed_nano(nano_model_and_tokenizer):
    model, tokenizer = nano_model_and_tokenizer
    model = copy.deepcopy(model)
    compress_model(model, _ids(2, 32, 8192), make_compressor("rtn", bits=3, group_size=128), [],
                   target_modules=LINEARS, progress=False)
    return model, tokenizer


# --- our own format -------------------------------------------------------------------------------------------


def test_save_load_is_exact_and_pickle_free(compressed_nano, tmp_path):
    model, tokenizer = compressed_nano
    out = save_compressed(model, tmp_path / "base", {"compress_method": "rtn", "bits": 3, "group_size": 128}, tokenizer)
    loaded = load_compressed(out)
    ids = _ids(2, 24, 8192, seed=1)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    assert len(_layers(loaded)) == 28 and not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie restored, not two copies
    meta = json.loads((out / "compression_config.json").read_text())
    assert meta["bits"] == 3 and len(meta["modules"]) == 28
    assert meta["modules"]["model.layers.0.self_attn.q_proj"] == {
        "bits": 3, "group_size": 128, "kept": None, "bias": False, "in_features": 256, "out_features": 256,
        "act_order": False}
    assert meta["format_version"] == cio.FORMAT_VERSION
    assert loaded.compression_config == meta
    files = sorted(os.listdir(out))
    assert {"config.json", "model.safetensors", "compression_config.json", "tokenizer.json"} <= set(files)
    for name in files:  # pickle streams start with 0x80; torch.save archives are zip files ("PK")
        head = (out / name).read_bytes()[:2]
        assert not name.endswith((".bin", ".pt", ".pth", ".pkl")) and head[:1] != b"\x80" and head != b"PK", name


def _two_four(rows, cols):
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    return mask.reshape(rows, cols)


def test_pruned_layers_round_trip_smaller_than_dense_and_pruned_quantized_ones_export(tmp_path):
    model = _tiny_model(bits=4)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g)
    mask = _two_four(64, 64)
    sparse = make_compressor("gptq+sparsegpt", sparsity="2:4", bits=4, group_size=32)
    stats = ActivationStats(64)
    stats.add_batch(torch.randn(256, 64, generator=g))
    joint = sparse.compress(w, stats)
    layer0 = model.model.layers[0].self_attn
    layer0.q_proj = joint.to_module(None, torch.float32)
    layer0.o_proj = SparseWeight(w * mask, mask).to_module(torch.randn(64), torch.float32)
    assert set(dict(layer0.q_proj.named_buffers())) == {"qweight", "scales", "zeros"}  # no mask stored
    assert set(dict(layer0.o_proj.named_buffers())) == {"values", "keep_bits"}
    o_bytes = sum(t.numel() * t.element_size() for t in layer0.o_proj.buffers())
    assert o_bytes == 64 * 32 * 4 + 64 * 8  # half the fp32 values + one bit per weight: 53% of dense fp32
    loaded = load_compressed(save_compressed(model, tmp_path / "m", {}))
    ids = _ids(seed=2)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    o_proj = loaded.model.layers[0].self_attn.o_proj
    assert o_proj.bits is None and o_proj.kept == 64 * 32 and torch.equal(o_proj.dequantize(), w * mask)
    assert torch.all(loaded.model.layers[0].self_attn.q_proj.dequantize()[~joint.mask] == 0)
    with pytest.raises(ValueError, match="pruned-only"):
        export_gptq(model, tmp_path / "g")
    layer0.o_proj = RTN(bits=4, group_size=32).compress(w).to_module(None, torch.float32)
    reloaded = import_gptq(export_gptq(model, tmp_path / "g2", checkpoint_format="gptq_v2"))
    exported_q = reloaded.model.layers[0].self_attn.q_proj.dequantize()
    assert torch.all(exported_q[~joint.mask] == 0)  # GPTQ kernels see the pruned codes at the zero point too
    assert torch.allclose(exported_q, layer0.q_proj.dequantize(), rtol=1e-3)  # fp16 scales in the GPTQ layout


def as_format_1(out, path: str, weight: torch.Tensor, mask: torch.Tensor) -> dict:
    """Rewrite the saved directory ``out`` as format 1 wrote it: the pruned-only layer ``path`` as a dense
    ``weight`` + bool ``mask``, "masked" in the module table, no ``kept`` or ``format_version``. Returns the meta."""
    state = load_file(str(out / "model.safetensors"))
    state.pop(f"{path}.values"), state.pop(f"{path}.keep_bits")
    state[f"{path}.weight"], state[f"{path}.mask"] = weight, mask
    save_file(state, str(out / "model.safetensors"))
    meta = json.loads((out / "compression_config.json").read_text())
    del meta["format_version"]
    for name, spec in meta["modules"].items():
        spec["masked"] = name == path
        del spec["kept"]
    (out / "compression_config.json").write_text(json.dumps(meta))
    return meta


def test_format_1_directories_with_dense_masks_still_load(tmp_path):
    model = _tiny_model(bits=4)
    g = torch.Generator().manual_seed(5)
    w, mask = torch.randn(128, 64, generator=g), _two_four(128, 64)  # gate_proj: 64 -> 128
    model.model.layers[1].mlp.gate_proj = SparseWeight(w * mask, mask).to_module(None, torch.float32)
    out = save_compressed(model, tmp_path / "v2", {})
    path = "model.layers.1.mlp.gate_proj"
    meta = as_format_1(out, path, w * mask, mask)
    loaded = load_compressed(out)
    assert torch.equal(loaded.get_submodule(path).dequantize(), w * mask)
    assert torch.equal(_logits(model, _ids(seed=6)), _logits(loaded, _ids(seed=6)))
    meta["format_version"] = cio.FORMAT_VERSION + 1
    (out / "compression_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer than this eora_ft reads"):
        load_compressed(out)


def test_nf4_model_round_trips(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    compress_model(model, _ids(), make_compressor("nf4"), [], target_modules=LINEARS, progress=False)
    loaded = load_compressed(save_compressed(model, tmp_path / "nf4", {"method": "nf4"}))
    ids = _ids(seed=4)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    q_proj = loaded.model.layers[1].self_attn.q_proj
    assert type(q_proj).__name__ == "NF4Linear"
    assert torch.equal(q_proj.dequantize(), model.model.layers[1].self_attn.q_proj.dequantize())


def test_interrupted_save_keeps_previous_directory(tmp_path, monkeypatch):
    model = _tiny_model()
    target = tmp_path / "out"
    save_compressed(model, target, {"run": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cio, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, target, {"run": 2})
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, tmp_path / "fresh", {"run": 2})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dir, no half-written "fresh"


def test_replacing_is_limited_to_previous_outputs(tmp_path):
    model = _tiny_model()
    target = tmp_path / "out"
    save_compressed(model, target, {"run": 1})
    save_compressed(model, target, {"run": 2})
    assert json.loads((target / "compression_config.json").read_text())["run"] == 2
    assert sorted(os.listdir(tmp_path)) == ["out"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        save_compressed(model, precious, {})
    with pytest.raises(FileExistsError, match="refusing to replace"):
        export_gptq(model, target)  # a save_compressed dir is not a GPTQ checkpoint
    assert (precious / "notes.txt").read_text() == "keep me"


def test_load_errors_name_the_directory_and_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_compressed(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json, model.safetensors, compression_config.json"):
        load_compressed(tmp_path / "empty")
    export_gptq(_tiny_model(), tmp_path / "gptq")
    with pytest.raises(FileNotFoundError, match="missing compression_config.json"):
        load_compressed(tmp_path / "gptq")
    with pytest.raises(FileNotFoundError, match="not a GPTQ checkpoint"):
        import_gptq(tmp_path / "empty")
    save_compressed(_tiny_model(), tmp_path / "ours", {})
    with pytest.raises(ValueError, match="ours is not a GPTQ checkpoint: no quantization_config"):
        import_gptq(tmp_path / "ours")


# --- GPTQ layout ----------------------------------------------------------------------------------------------


def _autogptq_pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ QuantLinear.pack's row loop, transcribed (uint32 words, codes [K, N])."""
    codes = codes.astype(np.uint32)
    out = np.zeros((codes.shape[0] // 32 * bits, codes.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits != 3:
            for j in range(i, i + 32 // bits):
                out[row] |= codes[j] << (bits * (j - i))
            i, row = i + 32 // bits, row + 1
            continue
        for j in range(i, i + 10):
            out[row] |= codes[j] << (3 * (j - i))
        i += 10
        out[row] |= codes[i] << 30
        row += 1
        out[row] |= (codes[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            out[row] |= codes[j] << (3 * (j - i) + 1)
        i += 10
        out[row] |= codes[i] << 31
        row += 1
        out[row] |= (codes[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            out[row] |= codes[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return out.astype(np.int32)


def test_three_bit_packing_matches_hand_computed_words():
    # codes 0..7 repeated: the 24-bit pattern 0xFAC688 four times = 96-bit stream 0xFAC688FAC688FAC688FAC688,
    # cut into little-endian 32-bit words
    expected = torch.tensor([0x88FAC688, 0xC688FAC6, 0xFAC688FA], dtype=torch.int64)
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).to(torch.int32)
    layer = CompressedLinear(32, 32, 3, -1)
    layer.qweight.copy_(pack_codes((torch.arange(32) % 8).view(32, 1).expand(32, 32), 3))
    layer.scales.fill_(0.5)
    layer.zeros.copy_((torch.arange(32) % 8 + 1).view(1, 32))  # v1 stores zero - 1 = 0..7 along N
    tensors = gptq_tensors(layer)
    assert torch.equal(tensors["qweight"], expected.view(3, 1).expand(3, 32))
    assert torch.equal(tensors["qzeros"], expected.view(1, 3))
    assert tensors["qweight"].dtype == tensors["qzeros"].dtype == tensors["g_idx"].dtype == torch.int32
    assert tensors["scales"].dtype == torch.float16 and torch.equal(tensors["g_idx"], torch.zeros(32, dtype=torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_autogptq_loop(bits):
    codes = torch.randint(0, 2**bits, (96, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_gptq(codes, bits)
    assert torch.equal(packed, torch.from_numpy(_autogptq_pack_rows(codes.numpy(), bits)))
    assert torch.equal(unpack_gptq(packed, bits, 96), codes)
    if bits != 3:  # 2/4/8: identical to our own storage
        assert torch.equal(packed, pack_codes(codes, bits))


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (8, True)])
def test_gptq_export_import_is_bit_exact(bits, sym, tmp_path):
    model = _tiny_model(bits=bits, sym=sym, seed=bits)
    export_gptq(model, tmp_path / "g")
    written = json.loads((tmp_path / "g" / "config.json").read_text())
    config = written["quantization_config"]
    fmt = "gptq" if sym else "gptq_v2"  # GPTQModel refuses asymmetric v1 it did not write; v2 it loads natively
    assert {k: config[k] for k in ("quant_method", "method", "bits", "group_size", "desc_act", "sym", "format",
                                   "checkpoint_format", "pack_dtype", "lm_head")} == {
        "quant_method": "gptq", "method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": sym,
        "format": fmt, "checkpoint_format": fmt, "pack_dtype": "int32", "lm_head": False}
    assert config["meta"]["quantizer"][0].startswith("eora_ft:")  # GPTQModel parses "name:version"
    assert written["dtype"] == "float16"  # vLLM's GPTQ kernels take fp16 only
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text()) == config
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    originals = _layers(model)
    for path, layer in originals.items():
        k, n = layer.in_features, layer.out_features
        assert tensors[f"{path}.qweight"].dtype == torch.int32 and tensors[f"{path}.qweight"].shape == (k * bits // 32, n)
        assert tensors[f"{path}.qzeros"].dtype == torch.int32 and tensors[f"{path}.qzeros"].shape == (k // 32, n * bits // 32)
        assert torch.equal(unpack_gptq(tensors[f"{path}.qweight"], bits, k), unpack_codes(layer.qweight, bits, k))
        assert torch.equal(unpack_gptq(tensors[f"{path}.qzeros"].t(), bits, n).t() + (1 if sym else 0), layer.zeros.long())
        assert torch.equal(tensors[f"{path}.scales"], layer.scales.half())
        assert torch.equal(tensors[f"{path}.g_idx"], (torch.arange(k) // 32).int())
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied: stored once

    imported = import_gptq(tmp_path / "g")
    for path, layer in _layers(imported).items():
        assert torch.equal(layer.qweight, originals[path].qweight) and torch.equal(layer.zeros, originals[path].zeros)
        assert torch.equal(layer.scales, originals[path].scales.half().float()) and layer.perm is None
    ids = _ids(seed=5)
    assert torch.equal(_logits(imported, ids), _logits(_with_fp16_scales(model), ids))

    export_gptq(imported, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == tensors.keys()
    assert all(again[k].dtype == tensors[k].dtype and torch.equal(again[k], tensors[k]) for k in tensors)


def test_act_order_checkpoint_imports_to_the_same_layer_function(tmp_path):
    model = _tiny_model(bits=4)
    export_gptq(model, tmp_path / "g")
    path = "model.layers.0.mlp.down_proj"  # K = 128: four groups of 32
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    order = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    codes = unpack_gptq(tensors[f"{path}.qweight"], 4, 128)
    # act-order layout: input k holds original column order[k] and names that column's group in g_idx
    tensors[f"{path}.qweight"] = pack_gptq(codes[order], 4)
    tensors[f"{path}.g_idx"] = (order // 32).int()
    save_file(tensors, str(tmp_path / "g" / "model.safetensors"), metadata={"format": "pt"})

    imported = import_gptq(tmp_path / "g")
    layer = imported.get_submodule(path)
    expected = _with_fp16_scales(model).get_submodule(path).dequantize()[:, order]
    assert layer.perm is not None and torch.equal(layer.dequantize(), expected)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.forward(x), torch.nn.functional.linear(x[..., layer.perm], layer._stored_weight()))

    export_gptq(imported, tmp_path / "again")  # the original act-order layout comes back
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert torch.equal(again[f"{path}.qweight"], tensors[f"{path}.qweight"])
    assert torch.equal(again[f"{path}.g_idx"], tensors[f"{path}.g_idx"])
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["desc_act"] is True
    reloaded = load_compressed(save_compressed(imported, tmp_path / "ours", {}))  # perm survives our format
    assert "quantization_config" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    ids = _ids(seed=7)
    assert torch.equal(_logits(reloaded, ids), _logits(imported, ids))


def test_import_takes_missing_tensors_from_the_base_model(tmp_path):
    model = _tiny_model(bits=4)
    export_gptq(model, tmp_path / "g")
    weights = tmp_path / "g" / "model.safetensors"
    quantized_only = {k: v for k, v in load_file(str(weights)).items() if k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    save_file(quantized_only, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys.*embed_tokens"):
        import_gptq(tmp_path / "g")
    imported = import_gptq(tmp_path / "g", base_model=model)
    ids = _ids(seed=6)
    assert torch.equal(_logits(imported, ids), _logits(_with_fp16_scales(model), ids))


def test_gptq_v1_cannot_store_zero_point_zero_but_v2_can(tmp_path):
    model = _tiny_model(bits=2)
    layer = model.model.layers[1].mlp.up_proj
    layer.zeros[0, :5] = 0
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.*gptq_v2"):
        export_gptq(model, tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()
    export_gptq(model, tmp_path / "v2")  # asymmetric: v2 unless asked otherwise
    imported = import_gptq(tmp_path / "v2")
    assert torch.equal(imported.model.layers[1].mlp.up_proj.zeros, layer.zeros)
    assert imported.compression_config["checkpoint_format"] == "gptq_v2"


def test_gptq_refuses_what_the_layout_cannot_carry(tmp_path):
    model = _tiny_model(bits=4)
    model.model.layers[1].mlp.down_proj = RTN(bits=3, group_size=32).compress(torch.randn(64, 128)).to_module(None, torch.float32)
    with pytest.raises(ValueError, match="one bit width"):
        export_gptq(model, tmp_path / "mixed")
    mask = torch.rand(64, 128, generator=torch.Generator().manual_seed(0)) > 0.5
    model.model.layers[1].mlp.down_proj = SparseWeight(torch.randn(64, 128) * mask, mask).to_module(None, torch.float32)
    with pytest.raises(ValueError, match="down_proj.*pruned-only"):
        export_gptq(model, tmp_path / "pruned")
    assert sorted(os.listdir(tmp_path)) == []


def test_import_rejects_unsupported_settings(tmp_path):
    export_gptq(_tiny_model(bits=4), tmp_path / "g")
    config_path = tmp_path / "g" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["bits"] = 5
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        import_gptq(tmp_path / "g")
    config["quantization_config"] |= {"bits": 4, "quant_method": "awq"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        import_gptq(tmp_path / "g")
    tensors = gptq_tensors(_tiny_model(bits=4).model.layers[0].mlp.down_proj)
    tensors["g_idx"] = torch.zeros(128, dtype=torch.int32)  # one group holding every input
    with pytest.raises(ValueError, match="exactly group_size"):
        layer_from_gptq(tensors, 4, 32)
    with pytest.raises(ValueError, match="group_size=16 is not supported"):
        layer_from_gptq(tensors, 4, 16)


def test_export_reads_the_recorded_compressor_options(tmp_path):
    model = _tiny_model(bits=4)
    saved = save_compressed(model, tmp_path / "m", {"method": "gptq", "options": {"damp_percent": 0.1, "sym": False},
                                                   "true_sequential": True})
    assert oct(os.stat(saved).st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    exported = export_gptq(load_compressed(saved), tmp_path / "g")
    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert config["damp_percent"] == 0.1 and config["sym"] is False
    assert config["true_sequential"] is True and config["meta"]["true_sequential"] is True  # what the run did
    plain = export_gptq(load_compressed(save_compressed(model, tmp_path / "m2", {"method": "gptq"})), tmp_path / "g2")
    assert json.loads((plain / "config.json").read_text())["quantization_config"]["true_sequential"] is False


def test_a_meta_load_builds_the_architecture_and_reads_no_weights(tmp_path):
    """What FSDP2's other ranks build (the main process broadcasts the weights): every parameter and saved buffer
    on the meta device, the same names and shapes as a real load, the rotary frequencies computed on the CPU."""
    directory = save_compressed(_tiny_model(), tmp_path / "m", {})
    real, shell = load_compressed(directory), load_compressed(directory, device="meta")
    real_state, shell_state = real.state_dict(), shell.state_dict()
    assert list(shell_state) == list(real_state)
    assert all(shell_state[k].shape == real_state[k].shape and shell_state[k].dtype == real_state[k].dtype
               and shell_state[k].is_meta for k in real_state)
    unsaved = {n: b for n, b in shell.named_buffers() if n not in shell_state}
    assert unsaved and all(b.device.type == "cpu" for b in unsaved.values())  # rotary inv_freq
    assert all(torch.equal(b, dict(real.named_buffers())[n]) for n, b in unsaved.items())
