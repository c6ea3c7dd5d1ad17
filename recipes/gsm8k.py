"""Compress a causal LM, initialise LoRA adapters from the compression error, fine-tune them on GSM8K.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/gsm8k.py --config recipes/configs/gsm8k_nano_gptq3_eora.yaml

Training sees ``Question: {question}\\nAnswer:`` and the full reference solution ending in
``#### n`` (loss on the solution only); evaluation is lm-evaluation-harness's ``gsm8k``: 5-shot,
greedy, exact match with strict (``#### n``) and flexible (last number) extraction.
"""

from __future__ import annotations

from pathlib import Path

from eora_ft.run.recipe import recipe_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "gsm8k_nano_gptq3_eora.yaml"


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(argv, DEFAULT_CONFIG, "gsm8k")


if __name__ == "__main__":
    main()
