"""What every recipe script does: parse (``--config file.yaml`` + flags), log the config, run, print the table."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import yaml
from accelerate import PartialState

from eora_ft.config import parse_recipe_args
from eora_ft.run.pipeline import run
from eora_ft.run.report import results_markdown
from eora_ft.eval.tasks import TASKS

logger = logging.getLogger("eora_ft")


def _config_text(objects) -> str:
    """The parsed dataclasses as YAML, one section per class (what actually ran, defaults included)."""
    sections = {}
    for obj in objects:
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        sections[type(obj).__name__] = {k: v for k, v in values.items() if not k.startswith("_")}
    return yaml.safe_dump(sections, sort_keys=False, default_flow_style=False)


def log_config(objects) -> None:
    """Log the parsed dataclasses (main process only)."""
    if PartialState().is_main_process:
        logger.info("config:\n%s", _config_text(objects))


def parse_recipe(argv: list[str] | None, default_config: Path | None, recipe: str) -> tuple:
    """The five recipe dataclasses for ``argv`` (default ``sys.argv[1:]``). Without ``--config``, ``default_config``
    is parsed exactly as ``--config default_config`` would be (when it exists), the flags overriding it
    (``recipes/arc.py --output_dir X`` is the demo written to X); ``--task`` must be one of ``recipe``'s tasks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names_config = any(arg == "--config" or arg.startswith("--config=") for arg in argv)
    if not names_config and default_config is not None and Path(default_config).is_file():
        # an installed package has no recipes/configs: the field defaults
        argv = ["--config", str(default_config), *argv]
    parsed = parse_recipe_args(argv)
    task = parsed[0].task
    allowed = sorted(name for name, entry in TASKS.items() if entry.recipe == recipe)
    if task not in allowed:
        raise ValueError(f"recipes/{recipe}.py runs task {' or '.join(allowed)}; got task={task!r} "
                         f"(recipes/{TASKS[task].recipe}.py runs that one)")
    return parsed


def recipe_main(argv: list[str] | None, default_config: Path | None, recipe: str) -> dict:
    """Run one recipe (:func:`parse_recipe`), log its config, print the results table."""
    task_args, compress_args, init_args, training_args, model_args = parse_recipe(argv, default_config, recipe)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    log_config((task_args, compress_args, init_args, model_args, training_args))
    results = run(task_args, compress_args, init_args, training_args, model_args)
    if results.get("stages", {}).get("base"):
        print(results_markdown(results))
        print(f"wrote {training_args.output_dir}/results.json, results.md and adapter/")
    return results
