"""``eora-ft compress``: compress a model with one of the registered methods and save it.

    eora-ft compress --model eora_ft/assets/models/nano-llama-5m --method gptq --bits 3 --group-size 128 --output runs/nano-gptq3

Prints a progress bar per layer and, at the end, each linear's relative output error
``||(W - W_c) X^T|| / ||W X^T||`` on the calibration activations. The model is loaded on the CPU and
one decoder layer at a time is compressed on ``--execution-device`` (the GPU when there is one).
"""

from __future__ import annotations

import argparse
import json

from eora_ft.compress import COMPRESSORS, USES_BITS, make_compressor
from eora_ft.compress.formats import WRITERS
from eora_ft.compress.sequential import compress_model
from eora_ft.config import LLAMA_LINEARS, CompressionArguments
from eora_ft.data import calibration_tokens, resolve_path
from eora_ft.placement import default_device


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompressionArguments()
    parser.add_argument("--model", required=True, help="hub id or local directory of a causal LM")
    parser.add_argument("--method", required=True, choices=sorted(COMPRESSORS))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=defaults.group_size, help="-1 = per channel")
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--grid-search", action="store_true", help="least-error grid per group (IST-DASLab's mse)")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                        help="GPTQ column order by decreasing Hessian diagonal (default: on for gptq)")
    parser.add_argument("--damp", type=float, default=defaults.damp_percent)
    parser.add_argument("--sparsity", default=defaults.sparsity, help="2:4, 4:8 or a ratio such as 0.5")
    parser.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=defaults.true_sequential,
                        help="re-collect statistics after q/k/v, o and gate/up within a layer (default: one pass)")
    parser.add_argument("--calib", default=defaults.calib_dataset, help="calibration text (.jsonl/.txt or hub id)")
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_num_samples)
    parser.add_argument("--calib-seq-len", type=int, default=defaults.calib_seq_len)
    parser.add_argument("--calib-seed", type=int, default=defaults.calib_seed)
    parser.add_argument("--targets", default=",".join(LLAMA_LINEARS), help="comma-separated linear names")
    add_placement_arguments(parser)
    parser.add_argument("--format", choices=sorted(WRITERS), default="eora_ft",
                        help="eora_ft: packed safetensors + compression_config.json (every method); gptq: the GPTQ "
                             "layout; compressed-tensors: llm-compressor's pack-quantized (vLLM, transformers)")
    parser.add_argument("--output", required=True, help="directory to write (replaced atomically)")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """``--execution-device`` / ``--calib-activations-device``: the CompressionArguments fields of the same names."""
    defaults = CompressionArguments()
    parser.add_argument("--execution-device", default=defaults.execution_device,
                        help="where each decoder layer is processed, one at a time: auto, cpu, cuda, cuda:N")
    parser.add_argument("--calib-activations-device", default=defaults.calib_activations_device,
                        choices=["execution", "cpu"], help="where calibration activations live between layers")


def error_table(rows: list[dict]) -> str:
    """Markdown table of the per-linear relative output errors (and any init's, if present)."""
    columns = [key for key in rows[0] if key.startswith("rel_out_err/")]
    lines = ["| layer | " + " | ".join(c.split("/", 1)[1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row['layer']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def compress_command(args: argparse.Namespace) -> int:
    """Validate everything, load, calibrate, compress, print the error table, save atomically."""
    from eora_ft.pipeline import check_model_against_config, load_model, require_source
    from eora_ft.config import EoraModelConfig

    options = CompressionArguments(
        compress_method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym, grid_search=args.grid_search,
        damp_percent=args.damp,
        act_order=args.act_order, true_sequential=args.true_sequential, sparsity=args.sparsity,
        calib_dataset=args.calib, calib_num_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        calib_seed=args.calib_seed, execution_device=args.execution_device,
        calib_activations_device=args.calib_activations_device,
    )
    if args.format != "eora_ft" and args.method not in USES_BITS:
        raise ValueError(f"--format {args.format} holds integer codes only (methods {sorted(USES_BITS)}), not "
                         f"--method {args.method}; use --format eora_ft")
    if args.format == "compressed-tensors":
        from eora_ft.compress.ct_format import _helpers

        _helpers()  # the library must be there before the compression runs, not after
    targets = [t for t in args.targets.split(",") if t]
    require_source(args.calib, "--calib")
    tokenizer, model = load_model(EoraModelConfig(model_name_or_path=args.model))
    check_model_against_config(model, targets, options)
    if args.format == "gptq":  # the layout packs 32 codes per run along K and N: check before compressing
        from eora_ft.compress.sequential import find_decoder_layers, target_linears

        for name, linear in target_linears(find_decoder_layers(model)[1][0], targets).items():
            if linear.in_features % 32 or linear.out_features % 32:
                raise ValueError(f"--format gptq needs in_features and out_features that are multiples of 32; "
                                 f"{name} is {linear.out_features}x{linear.in_features}: use --format eora_ft")
    calib = calibration_tokens(tokenizer, resolve_path(args.calib), options.calib_num_samples, options.calib_seq_len,
                               seed=options.calib_seed)
    execution, activations = options.placement(default_device())  # the model stays on the CPU
    result = compress_model(model, calib, make_compressor(args.method, **options.compressor_options()),
                            target_modules=targets, true_sequential=options.true_sequential, progress=True,
                            execution_device=execution, activations_device=activations)
    print(error_table(result.layers))
    config = {"method": args.method, "description": options.describe(), "model": args.model,
              "options": options.compressor_options(), "true_sequential": options.true_sequential,
              "calibration": {"dataset": args.calib, "num_samples": options.calib_num_samples,
                              "seq_len": options.calib_seq_len, "seed": options.calib_seed, "tokens": result.calib_tokens},
              "seconds": round(result.seconds, 2), "layers": result.layers}
    path = WRITERS[args.format](model, args.output, tokenizer=tokenizer, compression_config=config)
    print(json.dumps({"output": str(path), "method": options.describe(), "seconds": round(result.seconds, 2),
                      "calibration_tokens": result.calib_tokens}))
    return 0
