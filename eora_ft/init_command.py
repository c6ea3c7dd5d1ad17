"""``eora-ft init``: initialise a PEFT LoRA adapter for an already compressed model.

    eora-ft init --compressed runs/nano-gptq3 --method eora --rank 16 --output runs/nano-gptq3-eora16

The statistics come from the compressed model itself (each layer sees the compressed prefix, the
default capture mode); the error ``dW = W - W_c`` needs the original weights, read from the model the
compressed directory records (or ``--model``). LoftQ also rewrites the base: its ``Q_T`` is saved
next to the adapter in ``base/``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

from eora_ft.compress import StatsCollector, make_compressor
from eora_ft.compress.linear import set_module
from eora_ft.config import LLAMA_LINEARS, CompressionArguments
from eora_ft.init import INITIALIZERS, check_rank, get_initializer


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompressionArguments()
    parser.add_argument("--compressed", required=True, help="directory written by `eora-ft compress`")
    parser.add_argument("--model", default=None, help="the original model (default: the one the directory records)")
    parser.add_argument("--method", required=True, choices=sorted(INITIALIZERS))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: = rank)")
    parser.add_argument("--shrink", type=float, default=0.0, help="eora: covariance shrinkage, 0 = EoRA .. 1 = SVD")
    parser.add_argument("--loftq-iters", type=int, default=5)
    parser.add_argument("--factor-bits", type=int, default=None, choices=[3, 4, 8])
    parser.add_argument("--calib", default=defaults.calib_dataset)
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_num_samples)
    parser.add_argument("--calib-seq-len", type=int, default=defaults.calib_seq_len)
    parser.add_argument("--calib-seed", type=int, default=defaults.calib_seed)
    parser.add_argument("--targets", default=",".join(LLAMA_LINEARS))
    parser.add_argument("--output", required=True, help="adapter directory to write (replaced atomically)")


@torch.no_grad()
def collect_stats(model: nn.Module, modules: dict[str, nn.Module], calib: torch.Tensor, batch_size: int = 8):
    """One :class:`ActivationStats` per distinct input of ``modules`` over a full forward of ``model``."""
    collector = StatsCollector(modules)
    try:
        for start in range(0, calib.shape[0], batch_size):
            collector.next_batch()
            model(input_ids=calib[start:start + batch_size], use_cache=False)
    finally:
        collector.remove()
    return collector.stats


def init_command(args: argparse.Namespace) -> int:
    from eora_ft.compress.io import load_compressed, save_compressed
    from eora_ft.config import EoraModelConfig
    from eora_ft.data import calibration_tokens, resolve_path
    from eora_ft.pipeline import load_model, require_source
    from eora_ft.peft_bridge import build_lora_model, lora_config, save_adapter

    if args.rank < 1:
        raise ValueError(f"rank={args.rank} is invalid; valid: 1..min(in_features, out_features)")
    initializer = get_initializer(args.method)
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
    stats = collect_stats(compressed, modules, calib)
    missing = [path for path in modules if path not in stats]
    if missing:
        raise ValueError(f"no statistics were collected for {missing[:3]}: the calibration pass never reached them")

    compressor = make_compressor(meta["method"], **meta.get("options", {})) if args.method == "loftq" else None
    options = {"eora": {"shrink": args.shrink}, "loftq": {"iters": args.loftq_iters}}.get(args.method, {})
    generator = torch.Generator().manual_seed(args.calib_seed)
    factors = {}
    for path, module in modules.items():
        weight = original.get_submodule(path).weight.detach().to(torch.float32)
        delta = weight - module.dequantize(torch.float32)
        result = initializer(delta, stats[path], args.rank, generator=generator, weight=weight, compressor=compressor, **options)
        factors[path] = result.quantized(args.factor_bits) if args.factor_bits else result
        if result.base is not None:  # LoftQ: the adapter belongs to its own base
            set_module(compressed, path, result.base.to_module(module.bias, module.compute_dtype))

    base_dir = None
    if args.method == "loftq":  # written before PEFT wraps the layers; moved under the adapter at the end
        base_dir = save_compressed(compressed, f"{args.output}.loftq-base", {**meta, "loftq_iters": args.loftq_iters}, tokenizer)
    peft_model = build_lora_model(compressed, factors, lora_config(args.rank, args.alpha or args.rank, 0.0, targets))
    save_adapter(peft_model, args.output)
    if base_dir is not None:
        os.replace(base_dir, Path(args.output) / "base")
    effective = sorted({f.effective_rank for f in factors.values()})
    print(json.dumps({"output": args.output, "method": args.method, "rank": args.rank, "layers": len(factors),
                      "effective_ranks": effective, "calibration_tokens": int(calib.numel())}))
    return 0
