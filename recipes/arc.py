"""Compress a causal LM, initialise LoRA adapters from the compression error, fine-tune them on ARC.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/arc.py --config recipes/configs/arc_nano_gptq2_eora.yaml

With no arguments at all it runs that same offline demo on the bundled nano model. Any YAML key can
be overridden by a flag (``--bits 3 --lora_r 32``); unknown keys are an error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from eora_ft.config import parse_recipe_args
from eora_ft.pipeline import run
from eora_ft.report import results_markdown

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "arc_nano_gptq2_eora.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["--config", str(DEFAULT_CONFIG)]
    task_args, compress_args, init_args, training_args, model_args = parse_recipe_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("eora_ft").info("config: %s %s %s %s", task_args, compress_args, init_args, model_args)
    results = run(task_args, compress_args, init_args, training_args, model_args)
    if results.get("stages", {}).get("base"):
        print(results_markdown(results))
        print(f"wrote {training_args.output_dir}/results.json, results.md and adapter/")
    return results


if __name__ == "__main__":
    main()
