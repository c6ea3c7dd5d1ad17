"""Stage 8, the command line (``eora-ft``), one module per subcommand. May import every stage and config.

    eora-ft info                      versions and the registered compressors / initializers
    eora-ft compress --model_name_or_path M --compress_method gptq --bits 3 --output_dir DIR
                                      compress a model and save it (eora_ft/cli/compress.py)
    eora-ft init --compressed_model DIR --init_method eora --lora_r 16 --output_dir DIR
                                      a PEFT adapter initialised for a compressed model (eora_ft/cli/init.py)
    eora-ft eval --model_name_or_path M [--compressed_model DIR] [--adapter DIR]
                 --tasks arc_challenge,enwiki_heldout,wikitext2 --output_file results.json
                                      evaluate (lm-evaluation-harness semantics, offline; eora_ft/cli/eval.py)
    eora-ft merge --adapter RUN_DIR --output_dir DIR [--merge_format gptq] [--merge_residual_rank 16]
                                      fold a trained adapter into its compressed base (eora_ft/cli/merge.py)
    eora-ft arc|mathqa|gsm8k|text|sft --config FILE.yaml
                                      a recipe in this process (same flags as recipes/<task>.py)

compress, init and eval parse the recipe dataclasses' own fields (eora_ft/cli/arguments.py), so a flag
and a recipe's YAML key are one knob; each also takes ``--config file.yaml``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys


# what `eora-ft info` (and CI's log) reports: the packages whose releases change what a run does
VERSIONED = ("eora_ft", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "triton",
             "safetensors", "tokenizers", "huggingface_hub", "kernels", "compressed-tensors", "bitsandbytes", "numpy")


def _info() -> int:
    from eora_ft.compress import COMPRESSORS
    from eora_ft.init import INITIALIZERS

    for package in VERSIONED:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package:18s} {version}")
    print(f"{'compressors':18s} {', '.join(sorted(COMPRESSORS))}")
    print(f"{'initializers':18s} {', '.join(sorted(INITIALIZERS))}")
    return 0


# recipe -> its default config (the nano model, offline)
RECIPES = {"arc": "arc_nano_gptq2_eora", "mathqa": "mathqa_nano_gptq3_eora", "gsm8k": "gsm8k_nano_gptq3_eora",
           "text": "text_nano_gptq2_eora", "sft": "sft_nano_gptq2_eora"}


def _recipe(name: str, argv: list[str]) -> int:
    from pathlib import Path

    from eora_ft.run.recipe import recipe_main

    # In a checkout the recipe's default config exists; an installed package falls back to the defaults.
    default = Path(__file__).resolve().parents[2] / "recipes" / "configs" / f"{RECIPES[name]}.yaml"
    recipe_main(argv, default, name)
    return 0


# subcommand -> (module, help); each module has ``<name>_command(argv) -> int``
COMMANDS = {"compress": ("eora_ft.cli.compress", "compress a model and save it"),
            "init": ("eora_ft.cli.init", "initialise a LoRA adapter for a compressed model"),
            "eval": ("eora_ft.cli.eval", "evaluate a model / compressed model / adapter on tasks"),
            "merge": ("eora_ft.cli.merge", "fold a trained adapter into its compressed base, for serving")}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="eora-ft", description="Fine-tune compressed LLMs from EoRA-initialised adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and registered methods")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (--help lists its flags)", add_help=False)
    for name in RECIPES:
        sub.add_parser(name, help=f"run the {name} recipe (flags as recipes/{name}.py; --help lists them)", add_help=False)
    args, rest = parser.parse_known_args(argv[:1])  # the subcommand parses its own flags
    rest += argv[1:]
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _info()
    if args.command in COMMANDS:
        module = importlib.import_module(COMMANDS[args.command][0])
        return getattr(module, f"{args.command}_command")(rest)
    return _recipe(args.command, rest)

