"""``eora-ft``: the command-line entry point.

    eora-ft info                      versions and the registered compressors / initializers
    eora-ft compress --model M --method gptq --bits 3 --output DIR
                                      compress a model and save it (see eora_ft/commands.py)
    eora-ft init --compressed DIR --method eora --rank 16 --output DIR
                                      a PEFT adapter initialised for a compressed model
    eora-ft eval --model M [--compressed DIR] [--adapter DIR] --tasks arc_challenge,enwiki_heldout,wikitext2 --output results.json
                                      evaluate (lm-evaluation-harness semantics, offline; see eora_ft/eval_command.py)
    eora-ft arc|mathqa|gsm8k|text --config FILE.yaml
                                      a recipe in this process (same flags as recipes/<task>.py)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys


def _info() -> int:
    from eora_ft.compress import COMPRESSORS
    from eora_ft.init import INITIALIZERS

    for package in ("eora_ft", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed",
                    "bitsandbytes", "triton"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package:14s} {version}")
    print(f"compressors    {', '.join(sorted(COMPRESSORS))}")
    print(f"initializers   {', '.join(sorted(INITIALIZERS))}")
    return 0


# recipe -> its default config (the nano model, offline)
RECIPES = {"arc": "arc_nano_gptq2_eora", "mathqa": "mathqa_nano_gptq3_eora", "gsm8k": "gsm8k_nano_gptq3_eora",
           "text": "text_nano_gptq2_eora"}


def _recipe(name: str, argv: list[str]) -> int:
    from pathlib import Path

    from eora_ft.recipe import recipe_main

    # In a checkout the recipe's default config exists; an installed package falls back to the defaults.
    default = Path(__file__).resolve().parents[1] / "recipes" / "configs" / f"{RECIPES[name]}.yaml"
    recipe_main(argv, default, name)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="eora-ft", description="Fine-tune compressed LLMs from EoRA-initialised adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and registered methods")
    from eora_ft.commands import add_compress_arguments, compress_command

    add_compress_arguments(sub.add_parser("compress", help="compress a model and save it"))
    from eora_ft.init_command import add_init_arguments, init_command

    add_init_arguments(sub.add_parser("init", help="initialise a LoRA adapter for a compressed model"))
    from eora_ft.eval_command import add_eval_arguments, eval_command

    add_eval_arguments(sub.add_parser("eval", help="evaluate a model / compressed model / adapter on tasks"))
    for name in RECIPES:
        sub.add_parser(name, help=f"run the {name} recipe (flags as recipes/{name}.py; --help lists them)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "eval":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return eval_command(args)
    if args.command in ("compress", "init"):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return compress_command(args) if args.command == "compress" else init_command(args)
    return _recipe(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
