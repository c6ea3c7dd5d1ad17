"""Compress a causal LM, initialise LoRA adapters from the compression error, and recover it by language-model
fine-tuning on plain text: held-out perplexity before and after.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/text.py --config recipes/configs/text_nano_gptq2_eora.yaml

The LoftQ paper's protocol (Li et al. 2023, Table 5): fine-tune the adapters of a 2/3/4-bit model on
WikiText-2 train (``--dataset_name Salesforce/wikitext --dataset_config wikitext-2-raw-v1`` for a real model)
and report WikiText-2 test perplexity; at 2 bits on Llama-2-7B LoftQ reaches 7.85 where QLoRA does not
converge. The bundled default trains the nano model on one file of its own pretraining text (English
Wikipedia) and measures perplexity on the held-out file, held-out C4 and WikiText-2. A run whose
training loss turns NaN or stays above its start is reported as diverged.
"""

from __future__ import annotations

from pathlib import Path

from eora_ft.run.recipe import recipe_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "text_nano_gptq2_eora.yaml"


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(argv, DEFAULT_CONFIG, "text")


if __name__ == "__main__":
    main()
