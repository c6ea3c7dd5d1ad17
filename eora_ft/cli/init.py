"""``eora-ft init``: initialise a PEFT LoRA adapter for an already compressed model.

    eora-ft init --compressed_model runs/nano-gptq3 --init_method eora --lora_r 16 --output_dir runs/nano-gptq3-eora16

The flags are the recipe fields of the same names (``--help`` lists them): every field of
:class:`~eora_ft.config.AdapterInitArguments` (rank budget, refinement, capture, the adapter calibration...),
the calibration and LoRA-shape fields, plus ``--compressed_model``, ``--original_model`` and ``--output_dir``.
The computation is a recipe cache entry's (:func:`eora_ft.run.initial_adapter.initial_adapter`): the
statistics come from the compressed model itself (each layer sees the compressed prefix, the default capture
mode); the error ``dW = W - W_c`` needs the original weights, read from the model the compressed directory
records (or ``--original_model``). A checkpoint another tool compressed (GPTQ v1/v2, compressed-tensors; a
directory or a hub id) needs ``--original_model``: the two are checked against each other first
(:func:`eora_ft.run.precompressed.check_pair`), then it is imported once into a temporary copy in eora_ft's
format, and the adapter names the checkpoint as given. Both models stay on the CPU; one decoder layer at a
time runs on ``--execution_device`` (the GPU when there is one). LoftQ and eora_alt also rewrite the base:
it is saved next to the adapter in ``base/`` (refused for another tool's checkpoint, whose adapter must
belong to it). The adapter's ``adapter_config.json`` names the base it corrects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eora_ft.compress import make_compressor
from eora_ft.config import AdapterInitArguments, CompressionArguments, EoraModelConfig
from eora_ft.init import REBASING_INITS, check_rank
from eora_ft.init.expert_calibration import DEFAULT_MIN_SHARE
from eora_ft.utils.placement import default_device

from .arguments import LegacyFlag, LegacyFlags, dashed, fields_of, parse_command
from .compress import CALIBRATION_LEGACY

logger = logging.getLogger("eora_ft")

# every initialisation knob the recipes have (a test checks that none is missing)
INIT_FIELDS = [f.name for f in dataclasses.fields(AdapterInitArguments)]
CALIBRATION_FIELDS = ["calib_dataset", "calib_num_samples", "calib_seq_len", "calib_seed", "calib_batch_size",
                      "calib_task_dataset", "calib_task_format", "execution_device", "calib_activations_device"]
MODEL_FIELDS = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "dtype"]


@dataclass
class InitPaths:
    """What only ``eora-ft init`` has: the compressed model it starts from and where the adapter goes."""

    compressed_model: str = field(metadata={"help": "Directory written by `eora-ft compress` (or a recipe's cache "
                                                    "entry base/), or a checkpoint another tool compressed (GPTQ from "
                                                    "GPTQModel or AutoGPTQ, v1 or v2; compressed-tensors "
                                                    "pack-quantized from llm-compressor; a local directory or a hub "
                                                    "id), which needs --original_model."})
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
    """Parse, check, load both models on the CPU, run the layer-wise pass, save the PEFT adapter atomically.

    The adapter's ``adapter_config.json`` names the compressed model it corrects (``--compressed_model``, or
    ``<output_dir>/base`` when the initializer rewrote the base), never the uncompressed one."""
    from eora_ft.adapters.peft_bridge import load_adapter, save_adapter
    from eora_ft.compress.io import load_compressed, read_compression_config, recorded_options, save_compressed
    from eora_ft.compress.packed_reader import compressed_linears
    from eora_ft.data import mixed_calibration, resolve_path
    from eora_ft.data.task_text import task_texts
    from eora_ft.run.initial_adapter import initial_adapter
    from eora_ft.run.inputs import check_output_dir, check_sources, load_model
    from eora_ft.run.precompressed import build_imported_base, check_init_method, check_pair, resolve_checkpoint
    from eora_ft.utils.model_checks import check_positions

    init_args, calibration, lora, paths = parse(argv)
    method, rank = init_args.init_method, lora.lora_r
    check_output_dir(paths.output_dir, "output_dir")
    adapter_calib = (init_args.adapter_calib_dataset or "").split(",")
    check_sources([(part, "calib_dataset", "text") for part in calibration.calib_dataset.split(",")]  # before any load
                  + [(part, "adapter_calib_dataset", "text") for part in adapter_calib]
                  + [(calibration.calib_task_dataset, "calib_task_dataset", calibration.calib_task_format)])
    checkpoint = resolve_checkpoint(paths.compressed_model, "compressed_model")
    compressed_dir = checkpoint.directory  # read in eora_ft's format: another tool's checkpoint is imported first
    targets = lora.lora_target_modules  # None: every compressed linear (all-linear)
    scratch = None
    if checkpoint.format != "eora_ft":  # checked against its original before anything loads, imported once
        check_init_method(init_args, checkpoint)
        if not paths.original_model:
            raise ValueError(f"{paths.compressed_model} is a {checkpoint.format} checkpoint, which does not record the "
                             "model it was compressed from: pass --original_model")
        check_pair(paths.original_model, checkpoint, targets)
        output = Path(paths.output_dir).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix=f".{output.name}.imported-", dir=output.parent)  # gone on return
        build_imported_base(Path(scratch.name), checkpoint, torch.float32)
        compressed_dir = Path(scratch.name) / "base"
    meta, _ = read_compression_config(compressed_dir)
    specs = {path: spec for path, spec in meta["modules"].items()
             if targets is None or path.split(".")[-1] in targets}
    if not specs:
        raise ValueError(f"no compressed layer named {targets} in {paths.compressed_model}")
    if init_args.init_from_adapter:  # an existing adapter, checked against this base and re-saved naming it
        adapter = load_adapter(load_compressed(compressed_dir), os.path.expanduser(init_args.init_from_adapter),
                               is_trainable=True)
        save_adapter(adapter, paths.output_dir, checkpoint.name, revision=checkpoint.commit)
        print(json.dumps({"output": paths.output_dir, "from_adapter": init_args.init_from_adapter,
                          "base": checkpoint.name}))
        return 0
    for path, spec in specs.items():
        check_rank(rank, spec["in_features"], spec["out_features"], path)
    original_path = paths.original_model or meta.get("model")
    if not original_path:
        raise ValueError(f"{paths.compressed_model} does not record its original model: pass --original_model")
    # the original stays on the CPU in `dtype` (bf16 halves a 70B model's host memory); W - W_c is taken in fp32
    execution, activations = calibration.placement(default_device())
    tokenizer, original = load_model(EoraModelConfig(model_name_or_path=original_path, dtype=lora.dtype), execution)
    check_positions(original.config, {"calib_seq_len": calibration.calib_seq_len})
    # read one layer at a time as the driver reaches it, in the original's dtype, never the whole packed model
    modules = compressed_linears(compressed_dir, next(original.parameters()).dtype, targets)
    task_text = (task_texts(calibration.calib_task_format, resolve_path(calibration.calib_task_dataset))
                 if calibration.calib_task_dataset else [])
    task_fraction = init_args.adapter_calib_task_fraction if task_text else 0.0
    if init_args.adapter_calib_task_fraction and not task_text:
        logger.info("adapter calibration: generic text only (adapter_calib_task_fraction=%s takes its task share "
                    "from calib_task_dataset, which is not set)", init_args.adapter_calib_task_fraction)
    calib = mixed_calibration(tokenizer, init_args.adapter_calib_dataset or calibration.calib_dataset, task_text,
                              init_args.adapter_calib_num_samples or calibration.calib_num_samples,
                              calibration.calib_seq_len, task_fraction=task_fraction, seed=calibration.calib_seed)

    options = recorded_options(meta)
    compressor = make_compressor(meta["method"], **options) if method in REBASING_INITS else None
    output = Path(paths.output_dir).resolve()
    rewritten = output.with_name(f".{output.name}.{method}-base")  # moved in as <output_dir>/base

    def save_rewritten_base(model) -> None:  # before PEFT wraps the layers
        save_compressed(model, rewritten, {**meta, "rewritten_by": method, **init_args.options().get(method, {})},
                        tokenizer)

    # The original model runs layer by layer with the compressed linears swapped in, with the statistics scheme
    # the compressed model was made with (one pass per layer when it recorded none, the default): the factors are
    # those of compressing and initialising at once.
    initial = initial_adapter(original, modules, compressor, calib, init_args, lora, calibration.calib_seed,
                              batch_size=calibration.calib_batch_size,
                              true_sequential=bool(meta.get("true_sequential", False)),
                              expert_min_share=float(meta.get("expert_min_share", DEFAULT_MIN_SHARE)),
                              calib_seed=calibration.calib_seed, save_rewritten_base=save_rewritten_base,
                              execution_device=execution, activations_device=activations)
    del modules
    base = output / "base" if initial.base_replaced else checkpoint.name  # the user's checkpoint, as given
    save_adapter(initial.peft_model, output, str(base), move_in={"base": rewritten} if initial.base_replaced else None)
    rows = initial.meta["layers"]
    print(json.dumps({"output": paths.output_dir, "base": str(base), "method": method, "rank": rank,
                      "layers": len(rows), "calibration_tokens": int(calib.numel()),
                      "effective_ranks": sorted({row[f"effective_rank/{method}"] for row in rows}),
                      **({"rank_budget": {k: initial.meta["rank_budget"][k] for k in ("budget", "spent")}}
                         if "rank_budget" in initial.meta else {}),
                      **({"refine": {k: initial.meta["refine"][k] for k in ("loss_first", "loss_last")}}
                         if "refine" in initial.meta else {})}))
    return 0
