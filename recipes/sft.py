"""Compress a causal LM (or take one someone already compressed), initialise LoRA adapters from the compression
error, fine-tune them on your own data in any of TRL's dataset types.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py --config recipes/configs/sft_nano_gptq2_eora.yaml

Data (``dataset_name``: a local .jsonl/.json/.parquet/.csv file or directory, or a hub id with ``dataset_config``,
``dataset_train_split``, ``dataset_test_split``) in the layouts TRL's ``SFTTrainer`` takes: ``text``
(language modeling), ``prompt``/``completion`` (strings, or message lists), ``messages`` (conversations, through
the tokenizer's chat template). Loss on the completions / assistant turns (``completion_only_loss``,
``assistant_only_loss``). Without a test split a seeded ``eval_split_fraction`` of train is held out; the results
table gives its eval loss on the completions at every stage, beside the held-out perplexities. With no arguments
it runs the offline demo: GSM8K as conversations on the bundled nano model.
"""

from __future__ import annotations

from pathlib import Path

from eora_ft.run.recipe import recipe_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft_nano_gptq2_eora.yaml"


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(argv, DEFAULT_CONFIG, "sft")


if __name__ == "__main__":
    main()
