"""Every shipped config parses, with the defaults it should have (bad values: tests/test_bad_inputs.py)."""

from pathlib import Path

import pytest

from eora_ft.config import parse_recipe_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_starts_with_its_command(path):
    from eora_ft.run.compare import CompareArguments

    extra = (CompareArguments,) if path.name.startswith("compare_") else ()
    task, compress, init, training, model, *_ = parse_recipe_args(["--config", str(path)], extra=extra)
    assert model.lora_r >= 1 and compress.bits in (2, 3, 4, 8) and init.init_method
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch") and path.name in first


def _args(tmp_path, **overrides):
    cfg = ROOT / "recipes" / "configs" / "arc_nano_gptq2_eora.yaml"
    flags = ["--config", str(cfg), "--output_dir", str(tmp_path / "out")]
    for key, value in overrides.items():
        flags += [f"--{key}", str(value)]
    return flags


@pytest.mark.parametrize("method,given,expected", [("gptq", None, True), ("gptq", "false", False), ("rtn", None, False),
                                                     ("sparsegpt", None, False)])
def test_act_order_defaults_to_the_methods_own(tmp_path, method, given, expected):
    overrides = {"compress_method": method} | ({"act_order": given} if given is not None else {})
    compress = parse_recipe_args(_args(tmp_path, **overrides))[1]
    assert compress.act_order is expected and compress.compressor_options()["act_order"] is expected


def test_generated_configs_are_up_to_date():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_configs", ROOT / "recipes" / "configs" / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = module.grid()
    assert len(grid) == 3 * 3 * 3 * 2  # task x compression x init, nano and Llama-3-8B
    for name, text in grid.items():
        assert (ROOT / "recipes" / "configs" / name).read_text() == text, f"{name}: rerun make_configs.py"


@pytest.mark.parametrize("path", [p for p in CONFIGS if "_nano_" in p.name and not p.name.startswith("compare_")],
                         ids=lambda p: p.name)
def test_nano_configs_use_only_bundled_files(path):
    task, compress, init, training, model = parse_recipe_args(["--config", str(path)])
    for local in (model.model_name_or_path, task.dataset_name, task.eval_dataset_name, *task.ppl_dataset.split(","),
                  compress.calib_dataset):
        assert local is None or (ROOT / local).exists(), local  # no eval file: the sft task holds a share out
    recipe = path.read_text().splitlines()[0].split("recipes/")[1].split(".py")[0]
    from eora_ft.eval.tasks import get_task

    assert get_task(task.task).recipe == recipe


@pytest.mark.parametrize("recipe", ["arc", "mathqa", "gsm8k", "text", "sft", "compare"])
def test_recipe_help_lists_every_knob(recipe, capsys):
    import runpy

    module = runpy.run_path(str(ROOT / "recipes" / f"{recipe}.py"))
    with pytest.raises(SystemExit) as exit_info:
        module["main"](["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--compress_method", "--init_method", "--lora_r", "--task", "--cache_dir", "--num_fewshot",
                 "--learning_rate", "--report_to"):
        assert flag in text


def test_recipe_refuses_another_recipes_task(tmp_path):
    import runpy

    module = runpy.run_path(str(ROOT / "recipes" / "gsm8k.py"))
    with pytest.raises(ValueError, match=r"recipes/gsm8k.py runs task gsm8k; got task='arc_challenge'"):
        module["main"](["--task", "arc_challenge", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["arc", "mathqa", "gsm8k", "text"])
def test_no_arguments_parse_exactly_as_the_explicit_default_config(recipe):
    """`accelerate launch recipes/arc.py` (no arguments, as the README runs it) and `... --config <its default>`
    give the same five dataclasses, field by field (issue #32: report_to differed and broke transformers 5.24)."""
    import dataclasses
    import runpy

    from eora_ft.run.recipe import parse_recipe

    default = runpy.run_path(str(ROOT / "recipes" / f"{recipe}.py"))["DEFAULT_CONFIG"]
    implicit = parse_recipe([], default, recipe)
    explicit = parse_recipe_args(["--config", str(default)])
    for got, expected in zip(implicit, explicit):
        assert type(got) is type(expected)
        for item in dataclasses.fields(expected):
            assert getattr(got, item.name) == getattr(expected, item.name), (type(got).__name__, item.name)


def test_flags_without_config_override_the_default_config():
    """`recipes/arc.py --output_dir X` is the demo written to X, not the dataclass defaults (3 epochs, another rank)."""
    import runpy

    from eora_ft.run.recipe import parse_recipe

    default = runpy.run_path(str(ROOT / "recipes" / "arc.py"))["DEFAULT_CONFIG"]
    flagged = parse_recipe(["--output_dir", "/tmp/elsewhere"], default, "arc")
    explicit = parse_recipe_args(["--config", str(default)])
    assert flagged[3].output_dir == "/tmp/elsewhere"
    assert flagged[3].num_train_epochs == explicit[3].num_train_epochs == 2 and flagged[0] == explicit[0]


@pytest.mark.parametrize("given,expected", [
    ([], "tensorboard"),  # the field's default when nothing names it
    (["--report_to", "none"], "none"), (["--report_to", "None"], "none"),
    (["--report_to", "tensorboard"], "tensorboard"), (["--report_to", "tensorboard,tensorboard"], "tensorboard"),
    (["--report_to", "all"], "all"),
])
def test_report_to_reaches_the_trainer_as_a_value_every_transformers_release_takes(given, expected):
    """TrainingArguments turns "none" into [] and "all" into the installed integrations; a list holds names only
    (never None: transformers 5.24 refuses [None] when the Trainer starts, after compression)."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    training = parse_recipe_args(["--output_dir", "unused", *given])[3]
    want = {"none": [], "all": get_available_reporting_integrations()}.get(expected, [expected])
    assert training.report_to == want


@pytest.mark.parametrize("given,words", [
    ("wandb2", r"unknown integration\(s\) \['wandb2'\]; valid: none, all, or any of \["),
    ("tensorboard,none", r"'none' and 'all' stand alone"),
])
def test_a_bad_report_to_is_refused_at_parse_time(given, words):
    with pytest.raises(ValueError, match=words):
        parse_recipe_args(["--output_dir", "unused", "--report_to", given])


def test_nf4_without_bitsandbytes_names_the_extra_at_parse_time(monkeypatch):
    """bitsandbytes is the optional nf4 extra (PEFT imports it whenever it is installed, and it then probes the
    hub on AVX-512 BF16 CPUs); asking for nf4 without it is refused before any work, saying what to install."""
    from eora_ft.config import CompressionArguments

    monkeypatch.setattr("eora_ft.config.nf4_available", lambda: False)
    with pytest.raises(ValueError, match=r"compress_method='nf4'.*needs bitsandbytes: pip install -e \"\.\[nf4\]\""):
        CompressionArguments(compress_method="nf4")
    CompressionArguments(compress_method="gptq")  # every other method needs nothing of it
