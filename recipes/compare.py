"""Compare adapter initializations on one compressed model: same data, budget and seed for each.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/compare.py --config recipes/configs/compare_arc_nano_gptq2.yaml

Writes ``output_dir/results.md`` (rows: compression x init; columns: each metric before and after
fine-tuning), ``results.json``, ``loss_curves.png`` and one run folder with its own model card per
init. ``--inits qlora eora`` picks the initializers, ``--learning_rates 1e-4 3e-4`` sweeps the
rate for each (inits that start with a correction often prefer a smaller one).
A run whose folder already holds ``results.json`` with the same configuration is reused, so an
interrupted comparison picks up where it stopped (``--resume false`` reruns everything).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from accelerate import PartialState

from eora_ft.run.compare import CompareArguments, compare, comparison_markdown
from eora_ft.config import parse_recipe_args
from eora_ft.run.recipe import log_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "compare_arc_nano_gptq2.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv) or ["--config", str(DEFAULT_CONFIG)]
    *recipe_args, compare_args = parse_recipe_args(argv, extra=(CompareArguments,))
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    log_config((*recipe_args, compare_args))
    comparison = compare(*recipe_args, compare_args)
    if PartialState().is_main_process:
        print(comparison_markdown(comparison))
        print(f"wrote {recipe_args[3].output_dir}/results.md, results.json, loss_curves.png")
    return comparison


if __name__ == "__main__":
    main()
