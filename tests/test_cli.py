"""`eora-ft` subcommands: info, compress (progress, error table, saved directory), bad input."""

import json

import pytest

from eora_ft.cli import main

NANO = "eora_ft/assets/models/nano-llama-5m"
SMALL = ["--calib-samples", "2", "--calib-seq-len", "64"]


def test_info_lists_registries(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "gptq+sparsegpt" in out and "eora" in out and "torch" in out


def test_compress_writes_a_loadable_directory_and_prints_errors(tmp_path, capsys):
    out_dir = tmp_path / "nano-rtn4"
    assert main(["compress", "--model", NANO, "--method", "rtn", "--bits", "4", *SMALL, "--output", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.3.mlp.down_proj |" in printed
    config = json.loads((out_dir / "compression_config.json").read_text())
    assert config["method"] == "rtn" and config["calibration"]["tokens"] == 128 and len(config["layers"]) == 28
    from eora_ft.compress.io import load_compressed

    model = load_compressed(out_dir)
    assert sum(type(m).__name__ == "CompressedLinear" for m in model.modules()) == 28


@pytest.mark.parametrize("flags,error,match", [
    (["--method", "gptq", "--bits", "5"], ValueError, r"bits=5 is not supported; valid: \[2, 3, 4, 8\]"),
    (["--method", "gptq", "--group-size", "100"], ValueError, "group_size=100"),
    (["--method", "wanda", "--sparsity", "3:4"], ValueError, "sparsity='3:4'"),
    (["--method", "sparsegpt", "--format", "gptq"], ValueError, "--format gptq"),
    (["--method", "gptq", "--calib", "missing/c4.jsonl"], FileNotFoundError, "--calib 'missing/c4.jsonl' does not exist"),
])
def test_bad_input_stops_before_anything_is_written(tmp_path, flags, error, match):
    out_dir = tmp_path / "out"
    with pytest.raises(error, match=match):
        main(["compress", "--model", NANO, *SMALL, *flags, "--output", str(out_dir)])
    assert not out_dir.exists()


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_name_or_path './nowhere' does not exist"):
        main(["compress", "--model", "./nowhere", "--method", "rtn", *SMALL, "--output", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "nano-gptq2"
    assert main(["compress", "--model", NANO, "--method", "gptq", "--bits", "2", *SMALL, "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize("method", ["eora", "svd", "loftq"])
def test_init_writes_a_plain_peft_adapter_that_reloads(compressed_dir, tmp_path, method):
    import torch

    from eora_ft.compress.io import load_compressed
    from eora_ft.peft_bridge import load_adapter

    out = tmp_path / f"adapter-{method}"
    assert main(["init", "--compressed", str(compressed_dir), "--method", method, "--rank", "8", "--alpha", "16",
                 "--loftq-iters", "2", *SMALL, "--output", str(out)]) == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    base_dir = out / "base" if method == "loftq" else compressed_dir
    assert (method == "loftq") == (out / "base").exists()
    model = load_adapter(load_compressed(base_dir), out)
    ids = torch.randint(1, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert torch.isfinite(with_adapter).all() and not torch.equal(with_adapter, without)


def test_init_gives_the_factors_of_the_one_pass_recipe_path(compressed_dir, tmp_path):
    """`init` on a saved compressed model runs the same layer-wise driver with the saved linears: its
    statistics, hence its EoRA factors, are those of compressing and initialising in one pass."""
    import torch
    from safetensors.torch import load_file

    from eora_ft.compress import make_compressor
    from eora_ft.compress.sequential import compress_model
    from eora_ft.config import LLAMA_LINEARS, CompressionArguments, EoraModelConfig
    from eora_ft.data import calibration_tokens, resolve_path
    from eora_ft.pipeline import load_model

    out = tmp_path / "adapter"
    assert main(["init", "--compressed", str(compressed_dir), "--method", "eora", "--rank", "4", *SMALL,
                 "--output", str(out)]) == 0
    saved = load_file(str(out / "adapter_model.safetensors"))
    tokenizer, model = load_model(EoraModelConfig(model_name_or_path=NANO))
    calib = calibration_tokens(tokenizer, resolve_path(CompressionArguments().calib_dataset), 2, 64, seed=0)
    result = compress_model(model, calib, make_compressor("gptq", bits=2, group_size=128), ["eora"], rank=4,
                            target_modules=LLAMA_LINEARS, progress=False)
    path = "model.layers.2.mlp.down_proj"
    factors = result.factors[path]["eora"]
    a = saved[f"base_model.model.{path}.lora_A.weight"]
    b = saved[f"base_model.model.{path}.lora_B.weight"]
    assert torch.allclose(b @ a, factors.delta(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("flags,error,match", [
    (["--method", "eora", "--rank", "0"], ValueError, "rank=0 is invalid"),
    (["--method", "eora", "--rank", "200"], ValueError, r"rank=200 is invalid for .*k_proj .*valid: 1..128"),
])
def test_init_bad_input(compressed_dir, tmp_path, flags, error, match):
    out = tmp_path / "adapter"
    with pytest.raises(error, match=match):
        main(["init", "--compressed", str(compressed_dir), *flags, *SMALL, "--output", str(out)])
    assert not out.exists()


def test_init_unknown_method_lists_valid_ones(compressed_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["init", "--compressed", str(compressed_dir), "--method", "pissa", "--rank", "4", "--output", str(tmp_path / "a")])
    assert "invalid choice: 'pissa'" in capsys.readouterr().err
