"""The layer-by-layer driver on the real nano model: statistics sharing, replacement, factors."""

import copy

import pytest
import torch
from torch import nn

from eora_ft.compress import CompressedLinear, StatsCollector, make_compressor
from eora_ft.compress.sequential import compress_model, find_decoder_layers

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _calib(n=4, length=64, seed=0):
    return torch.randint(1, 8192, (n, length), generator=torch.Generator().manual_seed(seed))


def test_each_distinct_input_is_accumulated_once(nano_model_and_tokenizer):
    model, _ = nano_model_and_tokenizer
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    collector = StatsCollector(linears)
    hidden = torch.randn(2, 16, 256)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(16).unsqueeze(0))
    try:
        with torch.no_grad():
            for _ in range(3):
                collector.next_batch()
                layer(hidden, position_embeddings=position_embeddings)
    finally:
        collector.remove()
    distinct = collector.distinct()
    assert len(distinct) == 4  # q/k/v share, o alone, gate/up share, down alone
    s = collector.stats
    assert s["self_attn.q_proj"] is s["self_attn.k_proj"] is s["self_attn.v_proj"]
    assert s["mlp.gate_proj"] is s["mlp.up_proj"] and s["mlp.down_proj"] is not s["mlp.up_proj"]
    assert all(st.batches == 3 and st.tokens == 3 * 2 * 16 for st in distinct)


def test_compress_model_replaces_linears_and_factors_the_error(nano_model_and_tokenizer):
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = _calib()
    with torch.no_grad():
        before = model(input_ids=ids[:1]).logits
    result = compress_model(model, ids, make_compressor("gptq", bits=4, group_size=128), ["eora", "svd"], rank=8,
                            target_modules=LINEARS, batch_size=2, progress=False)
    compressed = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    assert len(compressed) == 4 * 7 and len(result.factors) == 28
    assert not any(isinstance(m, nn.Linear) for n, m in model.model.layers.named_modules())
    assert result.calib_tokens == ids.numel()
    for row in result.layers:
        assert row["tokens"] == ids.numel()
        assert row["rel_out_err/eora"] <= row["rel_out_err/svd"] + 1e-6 <= row["rel_out_err/compressed"] + 2e-6
    with torch.no_grad():
        after = model(input_ids=ids[:1]).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_no_decoder_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no decoder layers found in Sequential"):
        find_decoder_layers(nn.Sequential(nn.Linear(4, 4)))


def test_empty_calibration_is_rejected(nano_model_and_tokenizer):
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    with pytest.raises(ValueError, match="non-empty"):
        compress_model(model, torch.zeros(0, 16, dtype=torch.long), make_compressor("rtn", bits=4), progress=False)


def test_loftq_base_replaces_the_module_and_capture_modes_differ(nano_model_and_tokenizer):
    ids = _calib(n=2, length=32)
    compressor = make_compressor("rtn", bits=2, group_size=128)
    loftq_model = copy.deepcopy(nano_model_and_tokenizer[0])
    result = compress_model(loftq_model, ids, compressor, ["loftq"], rank=4, init_options={"loftq": {"iters": 2}},
                            target_modules=LINEARS, base_from="loftq", progress=False)
    path = "model.layers.2.mlp.down_proj"
    own = result.factors[path]["loftq"].base.dequantize()
    assert torch.equal(loftq_model.get_submodule(path).dequantize(torch.float32), own)

    plain, compensated = (copy.deepcopy(nano_model_and_tokenizer[0]) for _ in range(2))
    a = compress_model(plain, ids, compressor, ["eora"], rank=4, target_modules=LINEARS, progress=False)
    b = compress_model(compensated, ids, compressor, ["eora"], rank=4, target_modules=LINEARS,
                       capture="compensated", progress=False)
    first = "model.layers.0.self_attn.q_proj"  # sees the embeddings either way
    assert torch.equal(a.factors[first]["eora"].a, b.factors[first]["eora"].a)
    later = "model.layers.3.self_attn.q_proj"
    assert not torch.equal(a.factors[later]["eora"].a, b.factors[later]["eora"].a)
    with pytest.raises(ValueError, match="capture='nope'"):
        compress_model(plain, ids, compressor, ["eora"], capture="nope", progress=False)
