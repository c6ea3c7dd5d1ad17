"""PackedLinears: a saved compressed model's linears read one at a time, equal to the whole loaded model's."""

import json

import pytest
import torch

from eora_ft.compress import SparseWeight
from eora_ft.compress.io import load_compressed, save_compressed
from eora_ft.compress.packed_reader import PackedLinears, compressed_linears

from .test_io import _tiny_model, _two_four, as_format_1


def _same_layer(got, want) -> None:
    assert type(got) is type(want) and got.extra_repr() == want.extra_repr()
    mine, theirs = dict(got.named_buffers()), dict(want.named_buffers())
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name
    assert (got.bias is None) == (want.bias is None)
    assert got.bias is None or torch.equal(got.bias, want.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layer_equals_the_loaded_models_and_only_targets_are_listed(tmp_path, dtype):
    model = _tiny_model(bits=3, group_size=32)
    g = torch.Generator().manual_seed(1)
    w, mask = torch.randn(64, 64, generator=g), _two_four(64, 64)
    model.model.layers[0].self_attn.o_proj = SparseWeight(w * mask, mask).to_module(torch.randn(64), torch.float32)
    directory = save_compressed(model, tmp_path / "m", {"method": "rtn"})
    loaded = load_compressed(directory, dtype=dtype)
    packed = PackedLinears(directory, dtype)
    assert len(packed) == 14 and packed.meta["method"] == "rtn"
    for path in packed:
        layer = packed[path]
        assert layer is not packed[path]  # read afresh on every access: nothing is kept
        _same_layer(layer, loaded.get_submodule(path))
    mlp = PackedLinears(directory, dtype, targets=["down_proj", "o_proj"])
    assert sorted(mlp) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj",
                           "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    assert "model.layers.0.self_attn.q_proj" not in mlp and mlp.specs["model.layers.0.self_attn.o_proj"]["kept"]
    assert isinstance(compressed_linears(directory, dtype), PackedLinears)


def test_format_1_layers_and_mismatched_tensors(tmp_path):
    model = _tiny_model(bits=4)
    g = torch.Generator().manual_seed(5)
    w, mask = torch.randn(128, 64, generator=g), _two_four(128, 64)
    path = "model.layers.1.mlp.gate_proj"
    model.model.layers[1].mlp.gate_proj = SparseWeight(w * mask, mask).to_module(None, torch.float32)
    out = save_compressed(model, tmp_path / "v1", {})
    meta = as_format_1(out, path, w * mask, mask)
    assert torch.equal(PackedLinears(out)[path].dequantize(), w * mask)
    meta["format_version"] = 2
    meta["modules"]["model.layers.0.mlp.up_proj"]["in_features"] = 32  # the file's tensors no longer fit
    for spec in meta["modules"].values():
        spec["kept"] = None
    (out / "compression_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj do not fit"):
        PackedLinears(out)["model.layers.0.mlp.up_proj"]
