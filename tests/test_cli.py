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
