"""`eora-ft` subcommands: info, compress (progress, error table, saved directory), bad input."""

import json

import pytest

from eora_ft.cli import main

NANO = "eora_ft/assets/models/nano-llama-5m"
SMALL = ["--calib_num_samples", "2", "--calib_seq_len", "64"]


def test_info_lists_registries(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "gptq+sparsegpt" in out and "eora" in out and "torch" in out


def test_compress_writes_a_loadable_directory_and_prints_errors(tmp_path, capsys):
    out_dir = tmp_path / "nano-gptq4"
    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", "gptq", "--bits", "4", *SMALL,
                 "--output_dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.3.mlp.down_proj |" in printed
    config = json.loads((out_dir / "compression_config.json").read_text())
    assert config["method"] == "gptq" and config["calibration"]["tokens"] == 128 and len(config["layers"]) == 28
    # a data-free compressor collects no statistics (issue #34): the table says so instead of measuring
    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", "rtn", "--bits", "4", *SMALL,
                 "--output_dir", str(tmp_path / "nano-rtn4")]) == 0
    assert "28 linears compressed without calibration statistics: no output errors measured" in capsys.readouterr().out
    from eora_ft.compress.io import load_compressed

    model = load_compressed(out_dir)
    assert sum(type(m).__name__ == "CompressedLinear" for m in model.modules()) == 28


@pytest.mark.parametrize("flags,error,match", [
    (["--compress_method", "gptq", "--bits", "5"], ValueError, r"bits=5 is not supported; valid: \[2, 3, 4, 8\]"),
    (["--compress_method", "gptq", "--group_size", "100"], ValueError, "group_size=100"),
    (["--compress_method", "wanda", "--sparsity", "3:4"], ValueError, "sparsity='3:4'"),
    (["--compress_method", "sparsegpt", "--format", "gptq"], ValueError, "format='gptq'"),
    (["--compress_method", "gptq", "--calib_dataset", "missing/c4.jsonl"], FileNotFoundError, "calib_dataset 'missing/c4.jsonl' does not exist"),
])
def test_bad_input_stops_before_anything_is_written(tmp_path, flags, error, match):
    out_dir = tmp_path / "out"
    with pytest.raises(error, match=match):
        main(["compress", "--model_name_or_path", NANO, *SMALL, *flags, "--output_dir", str(out_dir)])
    assert not out_dir.exists()


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_name_or_path './nowhere' does not exist"):
        main(["compress", "--model_name_or_path", "./nowhere", "--compress_method", "rtn", *SMALL, "--output_dir", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "nano-gptq2"
    assert main(["compress", "--model_name_or_path", NANO, "--compress_method", "gptq", "--bits", "2", *SMALL, "--output_dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("method", ["eora", "svd", "loftq"])
def test_init_writes_a_plain_peft_adapter_that_reloads(compressed_dir, tmp_path, method):
    import torch

    from eora_ft.compress.io import load_compressed
    from eora_ft.adapters.peft_bridge import load_adapter

    out = tmp_path / f"adapter-{method}"
    assert main(["init", "--compressed_model", str(compressed_dir), "--init_method", method, "--lora_r", "8", "--lora_alpha", "16",
                 "--loftq_iters", "2", *SMALL, "--output_dir", str(out)]) == 0
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
    from eora_ft.init.sequential import compress_model
    from eora_ft.config import LLAMA_LINEARS, CompressionArguments, EoraModelConfig
    from eora_ft.data import calibration_tokens, resolve_path
    from eora_ft.run.inputs import load_model

    out = tmp_path / "adapter"
    assert main(["init", "--compressed_model", str(compressed_dir), "--init_method", "eora", "--lora_r", "4",
                 "--lora_alpha", "4", *SMALL, "--output_dir", str(out)]) == 0
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
    (["--init_method", "eora", "--lora_r", "0"], ValueError, "lora_r=0 is out of range"),
    (["--init_method", "eora", "--lora_r", "200"], ValueError, r"rank=200 is invalid for .*k_proj .*valid: 1..128"),
])
def test_init_bad_input(compressed_dir, tmp_path, flags, error, match):
    out = tmp_path / "adapter"
    with pytest.raises(error, match=match):
        main(["init", "--compressed_model", str(compressed_dir), *flags, *SMALL, "--output_dir", str(out)])
    assert not out.exists()


def test_init_unknown_method_lists_valid_ones(compressed_dir, tmp_path):
    with pytest.raises(ValueError, match=r"init_method='dora' is unknown; valid: \[.*'eora'"):
        main(["init", "--compressed_model", str(compressed_dir), "--init_method", "dora", "--lora_r", "4",
              "--output_dir", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()


# --- one declaration per knob: subcommand flags are the recipe dataclasses' fields -------------------------------

@pytest.mark.parametrize("command,sources", [
    ("compress", {"CompressionArguments": "COMPRESSION_FIELDS", "EoraModelConfig": "MODEL_FIELDS"}),
    ("init", {"AdapterInitArguments": "INIT_FIELDS", "CompressionArguments": "CALIBRATION_FIELDS",
              "EoraModelConfig": "MODEL_FIELDS"}),
    ("eval", {"TaskArguments": "TASK_FIELDS", "EoraModelConfig": "MODEL_FIELDS"}),
    ("merge", {"CompressionArguments": "MERGE_FIELDS"}),
])
def test_subcommand_flags_are_the_recipe_fields(command, sources):
    """Same name, same default, same help text as the recipe dataclass field (nothing re-declared)."""
    import dataclasses
    import importlib

    from eora_ft import config

    from trl import TrlParser

    module = importlib.import_module(f"eora_ft.cli.{command}")
    actions = {action.dest: action for action in TrlParser(module.DATACLASSES)._actions}
    for class_name, list_name in sources.items():
        declared = {f.name: f for f in dataclasses.fields(getattr(config, class_name))}
        for name in getattr(module, list_name):
            original, action = declared[name], actions[name]
            default = original.default if original.default is not dataclasses.MISSING else original.default_factory()
            assert action.default == default, (command, name)
            assert action.help == original.metadata["help"], (command, name)
            assert f"--{name}" in action.option_strings


@pytest.mark.parametrize("command,old,new", [
    ("compress",
     ["--model", NANO, "--method", "gptq", "--bits", "3", "--group-size", "64", "--no-act-order", "--damp", "0.05",
      "--calib", "eora_ft/assets/data/c4/c4_en_train_calib900.jsonl", "--calib-samples", "4", "--targets",
      "q_proj,v_proj", "--execution-device", "cpu", "--output", "out"],
     ["--model_name_or_path", NANO, "--compress_method", "gptq", "--bits", "3", "--group_size", "64", "--act_order",
      "false", "--damp_percent", "0.05", "--calib_dataset", "eora_ft/assets/data/c4/c4_en_train_calib900.jsonl",
      "--calib_num_samples", "4", "--lora_target_modules", "q_proj", "v_proj", "--execution_device", "cpu",
      "--output_dir", "out"]),
    ("init",
     ["--compressed", "c", "--model", NANO, "--method", "loftq", "--rank", "8", "--alpha", "8", "--loftq-iters", "2",
      "--factor-bits", "4", "--calib-seq-len", "64", "--output", "a"],
     ["--compressed_model", "c", "--original_model", NANO, "--init_method", "loftq", "--lora_r", "8", "--lora_alpha",
      "8", "--loftq_iters", "2", "--factor_bits", "4", "--calib_seq_len", "64", "--output_dir", "a"]),
    ("eval",
     ["--model", NANO, "--tasks", "arc_challenge,mathqa", "--limit", "3", "--batch-size", "4", "--data",
      "arc_challenge=x.jsonl", "--data", "mathqa=y.json", "--ppl-max-windows", "2", "--output", "r.json"],
     ["--model_name_or_path", NANO, "--tasks", "arc_challenge,mathqa", "--eval_limit", "3", "--eval_batch_size", "4",
      "--data", "arc_challenge=x.jsonl", "mathqa=y.json", "--ppl_max_windows", "2", "--output_file", "r.json"]),
])
def test_old_spellings_parse_to_the_same_values_with_a_deprecation(command, old, new):
    import importlib
    import warnings

    module = importlib.import_module(f"eora_ft.cli.{command}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new spellings warn about nothing
        expected = module.parse(new)
    with pytest.warns(FutureWarning, match=f"eora-ft {command}: --.* is deprecated and goes in eora_ft 0.2; use --"):
        assert module.parse(old) == expected


def test_subcommand_reads_a_config_file_and_rejects_unknown_keys(tmp_path):
    from eora_ft.cli import compress

    good = tmp_path / "c.yaml"
    good.write_text("compress_method: rtn\nbits: 4\ngroup_size: 64\noutput_dir: out\n")
    options, _, output = compress.parse(["--config", str(good), "--bits", "3"])  # the flag overrides the file
    assert (options.compress_method, options.bits, options.group_size, output.output_dir) == ("rtn", 3, 64, "out")
    bad = tmp_path / "b.yaml"
    bad.write_text("compress_method: rtn\ngroupsize: 64\noutput_dir: out\n")
    with pytest.raises(ValueError, match="groupsize"):
        compress.parse(["--config", str(bad)])


def test_init_takes_every_initialisation_knob_of_the_recipes():
    import dataclasses

    from eora_ft.cli import init
    from eora_ft.config import AdapterInitArguments

    assert set(init.INIT_FIELDS) == {f.name for f in dataclasses.fields(AdapterInitArguments)}
    # the adapter calibration's task half
    assert {"calib_task_dataset", "calib_task_format"} <= set(init.CALIBRATION_FIELDS)


def test_init_runs_the_beyond_eora_options(compressed_dir, tmp_path, capsys):
    """Rank budget, refinement, compensated capture and the adapter calibration's own size and task half reach
    the layer-wise pass (issue #32: they were refused as unknown flags)."""
    out = tmp_path / "adapter"
    assert main(["init", "--compressed_model", str(compressed_dir), "--lora_r", "4", "--rank_allocation", "budget",
                 "--refine_steps", "3", "--capture", "compensated", "--adapter_calib_num_samples", "3",
                 "--calib_task_dataset", "eora_ft/assets/data/arc/ARC-Challenge/ARC-Challenge-Train.jsonl",
                 "--adapter_calib_task_fraction", "0.34", *SMALL, "--output_dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["calibration_tokens"] == 3 * 64
    assert printed["rank_budget"]["spent"] <= printed["rank_budget"]["budget"]
    assert set(printed["refine"]) == {"loss_first", "loss_last"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"], "a budget gives linears their own ranks"


def test_an_unknown_flag_is_named_with_the_closest_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"eora-ft init: unknown argument\(s\) 'refine_stpes' \(closest: refine_steps"):
        main(["init", "--compressed_model", "c", "--output_dir", str(tmp_path / "a"), "--refine_stpes", "200"])
    assert not (tmp_path / "a").exists()


def test_init_checks_its_data_files_before_loading_any_model(tmp_path, monkeypatch):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut')
    monkeypatch.setattr("eora_ft.compress.io.load_compressed", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match=r"adapter_calib_dataset .*calib\.jsonl, line 2: not valid JSON"):
        main(["init", "--compressed_model", str(tmp_path), "--adapter_calib_dataset", str(bad),
              "--output_dir", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
