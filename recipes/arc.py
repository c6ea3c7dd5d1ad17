"""Compress a causal LM, initialise LoRA adapters from the compression error, fine-tune them on ARC.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/arc.py --config recipes/configs/arc_nano_gptq2_eora.yaml

With no arguments at all it runs that same offline demo on the bundled nano model. ``--task``
chooses ARC-Challenge (default) or ``arc_easy``. Any YAML key can be overridden by a flag
(``--bits 3 --lora_r 32``); unknown keys are an error.
"""

from __future__ import annotations

from pathlib import Path

from eora_ft.run.recipe import recipe_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "arc_nano_gptq2_eora.yaml"


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(argv, DEFAULT_CONFIG, "arc")


if __name__ == "__main__":
    main()
