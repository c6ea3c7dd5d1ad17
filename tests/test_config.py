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
        assert (ROOT / local).exists(), local
    recipe = path.read_text().splitlines()[0].split("recipes/")[1].split(".py")[0]
    from eora_ft.eval.tasks import get_task

    assert get_task(task.task).recipe == recipe


@pytest.mark.parametrize("recipe", ["arc", "mathqa", "gsm8k", "text", "compare"])
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
