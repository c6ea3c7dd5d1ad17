"""``eora-ft init``: initialise a PEFT LoRA adapter for an already compressed model.

    eora-ft init --compressed_model runs/nano-gptq3 --init_method eora --lora_r 16 --output_dir runs/nano-gptq3-eora16

The flags are the recipe fields of the same names (``--help`` lists them) plus ``--compressed_model``,
``--original_model`` and ``--output_dir``. The statistics come from the compressed model itself (each
layer sees the compressed prefix, the default capture mode); the error ``dW = W - W_c`` needs the
original weights, read from the model the compressed directory records (or ``--original_model``). Both
models stay on the CPU; one decoder layer at a time runs on ``--execution_device`` (the GPU when there is
one), through the same layer-wise driver as compression. LoftQ also rewrites the base: its ``Q_T`` is
saved next to the adapter in ``base/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eora_ft.compress import make_compressor
from eora_ft.config import AdapterInitArguments, CompressionArguments, EoraModelConfig
from eora_ft.init import REBASING_INITS, check_rank
from eora_ft.init.sequential import compress_model
from eora_ft.utils.placement import default_device

from .arguments import LegacyFlag, LegacyFlags, dashed, fields_of, parse_command
from .compress import CALIBRATION_LEGACY

INIT_FIELDS = ["init_method", "eora_eigen_mode", "eora_shrink", "loftq_iters", "eora_alt_iters", "factor_bits"]
CALIBRATION_FIELDS = ["calib_dataset", "calib_num_samples", "calib_seq_len", "calib_seed", "calib_batch_size",
                      "execution_device", "calib_activations_device"]
MODEL_FIELDS = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "dtype"]


@dataclass
class InitPaths:
    """What only ``eora-ft init`` has: the compressed model it starts from and where the adapter goes."""

    compressed_model: str = field(metadata={"help": "Directory written by `eora-ft compress` (or a recipe's cache "
                                                    "entry base/)."})
    output_dir: str = field(metadata={"help": "Adapter directory to write (replaced atomically)."})
    original_model: str | None = field(
        default=None, metadata={"help": "The uncompressed model (hub id or directory); None = the one "
                                        "compressed_model records."})


LEGACY = LegacyFlags("init", {
    "--compressed": LegacyFlag("--compressed_model"), "--model": LegacyFlag("--original_model"),
    "--method": LegacyFlag("--init_method"), "--rank": LegacyFlag("--lora_r"), "--alpha": LegacyFlag("--lora_alpha"),
    "--shrink": LegacyFlag("--eora_shrink"), **dashed("loftq_iters", "eora_alt_iters", "factor_bits"),
    **CALIBRATION_LEGACY,
})


# what the parser reads: recipe fields (copied, not re-declared) and this command's own
DATACLASSES = (fields_of(AdapterInitArguments, INIT_FIELDS), fields_of(CompressionArguments, CALIBRATION_FIELDS),
               fields_of(EoraModelConfig, MODEL_FIELDS), InitPaths)


def parse(argv: list[str]) -> tuple[AdapterInitArguments, CompressionArguments, EoraModelConfig, InitPaths]:
    """``argv`` -> the validated recipe dataclasses (init, calibration, LoRA shape) and the paths."""
    init, calibration, model, paths = parse_command(
        "eora-ft init", DATACLASSES,
        argv, LEGACY, description="Initialise a LoRA adapter for a compressed model.")
    return (AdapterInitArguments(**asdict(init)), CompressionArguments(**asdict(calibration)),
            EoraModelConfig(**asdict(model)), paths)


def init_command(argv: list[str]) -> int:
    """Parse, check, load both models on the CPU, run the layer-wise pass, save the PEFT adapter atomically."""
    from eora_ft.adapters.peft_bridge import build_lora_model, lora_config, save_adapter
    from eora_ft.compress.io import load_compressed, save_compressed
    from eora_ft.data import calibration_tokens, resolve_path
    from eora_ft.run.pipeline import load_model, require_source

    init_args, calibration, lora, paths = parse(argv)
    method, rank = init_args.init_method, lora.lora_r
    require_source(calibration.calib_dataset, "calib_dataset")
    compressed = load_compressed(require_source(paths.compressed_model, "compressed_model", hub_ok=False))
    meta = compressed.compression_config
    original_path = paths.original_model or meta.get("model")
    if not original_path:
        raise ValueError(f"{paths.compressed_model} does not record its original model: pass --original_model")
    # the original stays on the CPU in `dtype` (bf16 halves a 70B model's host memory); W - W_c is taken in fp32
    tokenizer, original = load_model(EoraModelConfig(model_name_or_path=original_path, dtype=lora.dtype))
    targets = lora.lora_target_modules  # None: every compressed linear (all-linear)
    modules = {path: m for path, m in compressed.named_modules()
               if hasattr(m, "dequantize") and (targets is None or path.split(".")[-1] in targets)}
    if not modules:
        raise ValueError(f"no compressed layer named {targets} in {paths.compressed_model}")
    for path, module in modules.items():
        check_rank(rank, module.in_features, module.out_features, path)
    calib = calibration_tokens(tokenizer, resolve_path(calibration.calib_dataset), calibration.calib_num_samples,
                               calibration.calib_seq_len, seed=calibration.calib_seed)

    rebases = method in REBASING_INITS
    compressor = make_compressor(meta["method"], **meta.get("options", {})) if rebases else None
    options = init_args.options().get(method, {})
    execution, activations = calibration.placement(default_device())
    # The original model runs layer by layer with the compressed linears swapped in, one layer at a time, with
    # the statistics scheme the compressed model was made with (recorded by `eora-ft compress` and the recipes;
    # one pass per layer when absent, the default): the factors are those of compressing and initialising at once.
    result = compress_model(original, calib, compressor, [method], rank=rank, init_options={method: options},
                            target_modules=targets, batch_size=calibration.calib_batch_size, seed=calibration.calib_seed,
                            true_sequential=bool(meta.get("true_sequential", False)),
                            factor_bits=init_args.factor_bits, base_from=method if rebases else None,
                            execution_device=execution, activations_device=activations, precompressed=modules)
    del compressed
    factors = {path: per_init[method] for path, per_init in result.factors.items()}

    base_dir = None
    if result.base_replaced:  # written before PEFT wraps the layers; moved under the adapter at the end
        base_dir = save_compressed(original, f"{paths.output_dir}.{method}-base",
                                   {**meta, "rewritten_by": method, **options}, tokenizer)
    peft_model = build_lora_model(original, factors, lora_config(rank, lora.lora_alpha, lora.lora_dropout, targets))
    save_adapter(peft_model, paths.output_dir)
    if base_dir is not None:
        os.replace(base_dir, Path(paths.output_dir) / "base")
    effective = sorted({f.effective_rank for f in factors.values()})
    print(json.dumps({"output": paths.output_dir, "method": method, "rank": rank, "layers": len(factors),
                      "effective_ranks": effective, "calibration_tokens": int(calib.numel())}))
    return 0
