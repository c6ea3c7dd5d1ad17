"""``eora-ft init``: initialise a PEFT LoRA adapter for an already compressed model.

    eora-ft init --compressed runs/nano-gptq3 --method eora --rank 16 --output runs/nano-gptq3-eora16

The statistics come from the compressed model itself (each layer sees the compressed prefix, the
default capture mode); the error ``dW = W - W_c`` needs the original weights, read from the model the
compressed directory records (or ``--model``). Both models stay on the CPU; one decoder layer at a
time runs on ``--execution-device`` (the GPU when there is one), through the same layer-wise
driver as compression. LoftQ also rewrites the base: its ``Q_T`` is saved next to the adapter in
``base/``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from eora_ft.commands import add_placement_arguments
from eora_ft.compress import make_compressor
from eora_ft.compress.sequential import compress_model
from eora_ft.config import LLAMA_LINEARS, CompressionArguments
from eora_ft.init import INITIALIZERS, REBASING_INITS, check_rank, get_initializer
from eora_ft.placement import default_device


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompressionArguments()
    parser.add_argument("--compressed", required=True, help="directory written by `eora-ft compress`")
    parser.add_argument("--model", default=None, help="the original model (default: the one the directory records)")
    parser.add_argument("--method", required=True, choices=sorted(INITIALIZERS))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: = rank)")
    parser.add_argument("--shrink", type=float, default=0.0, help="eora: covariance shrinkage, 0 = EoRA .. 1 = SVD")
    parser.add_argument("--loftq-iters", type=int, default=5)
    parser.add_argument("--eora-alt-iters", type=int, default=2, help="eora_alt: alternations after plain EoRA")
    parser.add_argument("--factor-bits", type=int, default=None, choices=[3, 4, 8])
    parser.add_argument("--calib", default=defaults.calib_dataset)
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_num_samples)
    parser.add_argument("--calib-seq-len", type=int, default=defaults.calib_seq_len)
    parser.add_argument("--calib-seed", type=int, default=defaults.calib_seed)
    parser.add_argument("--targets", default=",".join(LLAMA_LINEARS))
    add_placement_arguments(parser)
    parser.add_argument("--output", required=True, help="adapter directory to write (replaced atomically)")



def init_command(args: argparse.Namespace) -> int:
    from eora_ft.compress.io import load_compressed, save_compressed
    from eora_ft.config import EoraModelConfig
    from eora_ft.data import calibration_tokens, resolve_path
    from eora_ft.peft_bridge import build_lora_model, lora_config, save_adapter
    from eora_ft.pipeline import load_model, require_source

    if args.rank < 1:
        raise ValueError(f"rank={args.rank} is invalid; valid: 1..min(in_features, out_features)")
    get_initializer(args.method)
    placement = CompressionArguments(execution_device=args.execution_device,
                                     calib_activations_device=args.calib_activations_device)
    require_source(args.calib, "--calib")
    compressed = load_compressed(require_source(args.compressed, "--compressed", hub_ok=False))
    meta = compressed.compression_config
    original_path = args.model or meta.get("model")
    if not original_path:
        raise ValueError(f"{args.compressed} does not record its original model: pass --model")
    tokenizer, original = load_model(EoraModelConfig(model_name_or_path=original_path))
    targets = [t for t in args.targets.split(",") if t]
    modules = {path: m for path, m in compressed.named_modules()
               if path.split(".")[-1] in targets and hasattr(m, "dequantize")}
    if not modules:
        raise ValueError(f"no compressed layer named {targets} in {args.compressed}")
    for path, module in modules.items():
        check_rank(args.rank, module.in_features, module.out_features, path)
    calib = calibration_tokens(tokenizer, resolve_path(args.calib), args.calib_samples, args.calib_seq_len, seed=args.calib_seed)

    rebases = args.method in REBASING_INITS
    compressor = make_compressor(meta["method"], **meta.get("options", {})) if rebases else None
    options = {"eora": {"shrink": args.shrink}, "eora_alt": {"shrink": args.shrink, "iters": args.eora_alt_iters},
               "loftq": {"iters": args.loftq_iters}}.get(args.method, {})
    execution, activations = placement.placement(default_device())
    # The original model runs layer by layer with the compressed linears swapped in, one layer at a time, with
    # the statistics scheme the compressed model was made with (recorded by `eora-ft compress` and the recipes;
    # one pass per layer when absent, the default): the factors are those of compressing and initialising at once.
    result = compress_model(original, calib, compressor, [args.method], rank=args.rank,
                            init_options={args.method: options}, target_modules=targets, seed=args.calib_seed,
                            true_sequential=bool(meta.get("true_sequential", False)), factor_bits=args.factor_bits,
                            base_from=args.method if rebases else None, execution_device=execution,
                            activations_device=activations, precompressed=modules)
    del compressed
    factors = {path: per_init[args.method] for path, per_init in result.factors.items()}

    base_dir = None
    if result.base_replaced:  # written before PEFT wraps the layers; moved under the adapter at the end
        base_dir = save_compressed(original, f"{args.output}.{args.method}-base", {**meta, "rewritten_by": args.method,
                                                                                  **options}, tokenizer)
    peft_model = build_lora_model(original, factors, lora_config(args.rank, args.alpha or args.rank, 0.0, targets))
    save_adapter(peft_model, args.output)
    if base_dir is not None:
        os.replace(base_dir, Path(args.output) / "base")
    effective = sorted({f.effective_rank for f in factors.values()})
    print(json.dumps({"output": args.output, "method": args.method, "rank": args.rank, "layers": len(factors),
                      "effective_ranks": effective, "calibration_tokens": int(calib.numel())}))
    return 0
