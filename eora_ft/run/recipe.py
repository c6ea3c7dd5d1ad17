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


def recipe_main(argv: list[str] | None, default_config: Path | None, recipe: str) -> dict:
    """Run one recipe. With no arguments, ``default_config`` runs; ``--task`` must be one of ``recipe``'s tasks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and default_config is not None and Path(default_config).exists():
        argv = ["--config", str(default_config)]
    task_args, compress_args, init_args, training_args, model_args = parse_recipe_args(argv)
    allowed = sorted(name for name, task in TASKS.items() if task.recipe == recipe)
    if task_args.task not in allowed:
        raise ValueError(f"recipes/{recipe}.py runs task {' or '.join(allowed)}; got task={task_args.task!r} "
                         f"(recipes/{TASKS[task_args.task].recipe}.py runs that one)")
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    log_config((task_args, compress_args, init_args, model_args, training_args))
    results = run(task_args, compress_args, init_args, training_args, model_args)
    if results.get("stages", {}).get("base"):
        print(results_markdown(results))
        print(f"wrote {training_args.output_dir}/results.json, results.md and adapter/")
    return results
