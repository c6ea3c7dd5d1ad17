"""``eora-ft compress``: compress a model with one of the registered methods and save it.

    eora-ft compress --model_name_or_path eora_ft/assets/models/nano-llama-5m --compress_method gptq --bits 3 \
        --group_size 128 --output_dir runs/nano-gptq3

Every flag but ``--output_dir`` and ``--format`` is the recipe field of the same name (``--help`` lists
them with their defaults; ``--config file.yaml`` reads them from a file). Prints a progress bar per layer
and, at the end, each linear's relative output error ``||(W - W_c) X^T|| / ||W X^T||`` on the calibration
activations. The model is loaded on the CPU and one decoder layer at a time is compressed on
``--execution_device`` (the GPU when there is one).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from eora_ft.compress import COMPRESSORS, USES_BITS, make_compressor
from eora_ft.compress.formats import WRITERS
from eora_ft.config import CompressionArguments, EoraModelConfig
from eora_ft.data import calibration_tokens, resolve_path
from eora_ft.init.sequential import compress_model
from eora_ft.utils.placement import default_device

from .arguments import LegacyFlag, LegacyFlags, dashed, fields_of, parse_command, split_commas

logger = logging.getLogger("eora_ft")

COMPRESSION_FIELDS = ["compress_method", "bits", "group_size", "sym", "grid_search", "damp_percent", "act_order",
                      "true_sequential", "expert_min_share", "sparsity", "calib_dataset", "calib_num_samples", "calib_seq_len",
                      "calib_seed", "calib_batch_size", "execution_device", "calib_activations_device"]
MODEL_FIELDS = ["model_name_or_path", "dtype", "lora_target_modules"]


@dataclass
class CompressOutput:
    """What only ``eora-ft compress`` has: where and how the compressed model is written."""

    output_dir: str = field(metadata={"help": "Directory to write (replaced atomically)."})
    format: str = field(
        default="eora_ft",
        metadata={"help": "eora_ft: packed safetensors + compression_config.json (every method); gptq: the GPTQ "
                          "layout; compressed-tensors: llm-compressor's pack-quantized (vLLM, transformers).",
                  "choices": sorted(WRITERS)})


# 0.1's spellings, kept for one release
PLACEMENT_LEGACY = dashed("execution_device", "calib_activations_device")
CALIBRATION_LEGACY = {"--calib": LegacyFlag("--calib_dataset"), "--calib-samples": LegacyFlag("--calib_num_samples"),
                      **dashed("calib_seq_len", "calib_seed"),
                      "--targets": LegacyFlag("--lora_target_modules", split_commas),
                      "--output": LegacyFlag("--output_dir"), **PLACEMENT_LEGACY}
LEGACY = LegacyFlags("compress", {
    "--model": LegacyFlag("--model_name_or_path"), "--method": LegacyFlag("--compress_method"),
    "--damp": LegacyFlag("--damp_percent"), "--grid-search": LegacyFlag("--grid_search", switch="true"),
    "--act-order": LegacyFlag("--act_order", switch="true"), "--no-act-order": LegacyFlag("--act_order", switch="false"),
    "--true-sequential": LegacyFlag("--true_sequential", switch="true"),
    "--no-true-sequential": LegacyFlag("--true_sequential", switch="false"),
    **dashed("group_size"), **CALIBRATION_LEGACY,
})


# what the parser reads: recipe fields (copied, not re-declared) and this command's own
DATACLASSES = (fields_of(CompressionArguments, COMPRESSION_FIELDS), fields_of(EoraModelConfig, MODEL_FIELDS), CompressOutput)


def parse(argv: list[str]) -> tuple[CompressionArguments, EoraModelConfig, CompressOutput]:
    """``argv`` -> the validated recipe dataclasses (compression, model) and the output options."""
    compression, model, output = parse_command(
        "eora-ft compress",
        DATACLASSES,
        argv, LEGACY, description="Compress a model and save it.")
    return CompressionArguments(**asdict(compression)), EoraModelConfig(**asdict(model)), output


def error_table(rows: list[dict]) -> str:
    """Markdown table of the per-linear relative output errors (and any init's, if present)."""
    columns = [key for key in rows[0] if key.startswith("rel_out_err/")]
    if not columns:  # a data-free compressor (rtn, nf4): no statistics were collected to measure them with
        return f"({len(rows)} linears compressed without calibration statistics: no output errors measured)"
    lines = ["| layer | " + " | ".join(c.split("/", 1)[1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row['layer']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def compress_command(argv: list[str]) -> int:
    """Validate everything, load, calibrate, compress, print the error table, save atomically."""
    from eora_ft.init.coverage import compression_coverage
    from eora_ft.init.sequential import find_decoder_layers, target_linears
    from eora_ft.run.inputs import check_model_against_config, check_output_dir, load_model, require_source
    from eora_ft.utils.model_checks import check_positions

    options, model_args, output = parse(argv)
    method = options.compress_method
    if method not in USES_BITS and output.format != "eora_ft":
        raise ValueError(f"format={output.format!r} holds integer codes only (compress_method one of "
                         f"{sorted(USES_BITS)}), not compress_method={method!r}; use format='eora_ft'")
    if method not in COMPRESSORS:  # the recipes' "none" (the uncompressed ceiling) has nothing to write
        raise ValueError(f"compress_method={method!r} compresses nothing; valid here: {sorted(COMPRESSORS)}")
    if output.format == "compressed-tensors":
        from eora_ft.compress.ct_format import _helpers

        _helpers()  # the library must be there before the compression runs, not after
    targets = model_args.lora_target_modules
    require_source(options.calib_dataset, "calib_dataset")
    check_output_dir(output.output_dir, "output_dir")
    execution, activations = options.placement(default_device())  # the model stays on the CPU
    tokenizer, model = load_model(model_args, execution)
    check_model_against_config(model, targets, options)
    coverage = compression_coverage(model, targets)
    if coverage.warning():  # before the calibration: a mixture-of-experts model is barely compressed
        logger.warning("%s", coverage.warning())
    check_positions(model.config, {"calib_seq_len": options.calib_seq_len})
    if output.format == "gptq":  # the layout packs 32 codes per run along K and N: check before compressing
        for name, linear in target_linears(find_decoder_layers(model)[1][0], targets).items():
            if linear.in_features % 32 or linear.out_features % 32:
                raise ValueError(f"format='gptq' needs in_features and out_features that are multiples of 32; "
                                 f"{name} is {linear.out_features}x{linear.in_features}: use format='eora_ft'")
    calib = calibration_tokens(tokenizer, resolve_path(options.calib_dataset), options.calib_num_samples,
                               options.calib_seq_len, seed=options.calib_seed)
    result = compress_model(model, calib, make_compressor(method, **options.compressor_options()),
                            target_modules=targets, batch_size=options.calib_batch_size,
                            true_sequential=options.true_sequential, progress=True,
                            expert_min_share=options.expert_min_share,
                            execution_device=execution, activations_device=activations)
    print(error_table(result.layers))
    config = {"method": method, "description": options.describe(), "model": model_args.model_name_or_path,
              "options": options.compressor_options(), "true_sequential": options.true_sequential,
              "expert_min_share": options.expert_min_share, "expert_routing": result.expert_routing,
              "calibration": {"dataset": options.calib_dataset, "num_samples": options.calib_num_samples,
                              "seq_len": options.calib_seq_len, "seed": options.calib_seed, "tokens": result.calib_tokens},
              "seconds": round(result.seconds, 2), "layers": result.layers}
    path = WRITERS[output.format](model, output.output_dir, tokenizer=tokenizer, compression_config=config)
    print(json.dumps({"output": str(path), "method": options.describe(), "seconds": round(result.seconds, 2),
                      "decoder_weights_compressed": coverage.summary(),
                      "calibration_tokens": result.calib_tokens}))
    return 0
