"""Compress a causal LM, initialise LoRA adapters from the compression error, fine-tune them on MathQA.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/mathqa.py --config recipes/configs/mathqa_nano_gptq3_eora.yaml

Training sees ``Question: {Problem}\\nAnswer:`` and the gold option's text (loss on the option only);
evaluation scores every option by log-likelihood, as lm-evaluation-harness's ``mathqa``. Only the
dev and test files exist offline here, so the nano configs train on dev and evaluate on test.
"""

from __future__ import annotations

from pathlib import Path

from eora_ft.run.recipe import recipe_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mathqa_nano_gptq3_eora.yaml"


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(argv, DEFAULT_CONFIG, "mathqa")


if __name__ == "__main__":
    main()
