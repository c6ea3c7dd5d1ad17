"""Compression and adapter initialization as two kinds of cached artifacts: what each key covers, how each
entry is built and how a run loads them.

A **base entry** holds the compressed model (``base/``) and is keyed by the compressor's inputs only:
the model's contents, the compression settings, the compressor's calibration tokens and the target
linears. An **init entry** holds one initial adapter (``init/``, plus ``base/`` when the initializer
rewrites the base, as LoftQ's ``Q_T`` does) and is keyed by its base entry's key, the initializer's
settings, the LoRA shape, the adapter calibration tokens and the seed. So one compressed base serves
any number of task adapters: a second task, rank or initializer on the same model finds the base
(``base: hit``) and only runs the initializer's own layer-by-layer pass, on its own calibration.

``compress_method: none`` is the uncompressed ceiling: its base entry records the model to load
instead of storing a copy, and its adapter starts as PEFT's plain LoRA (``B = 0``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from eora_ft.run.cache import META, model_fingerprint, read_meta, tensor_fingerprint
from eora_ft.compress import make_compressor
from eora_ft.compress.experts import expert_owners
from eora_ft.compress.io import load_compressed, save_compressed
from eora_ft.compress.packed_reader import compressed_linears
from eora_ft.init.sequential import compress_model
from eora_ft.config import UNCOMPRESSED, AdapterInitArguments, CompressionArguments, EoraModelConfig
from eora_ft.data.sources import resolve_path
from eora_ft.init import SEEDED_INITS
from eora_ft.adapters.peft_bridge import build_lora_model, load_adapter, lora_config, save_adapter
from eora_ft.run.initial_adapter import initial_adapter

BASE_DIR, INIT_DIR = "base", "init"
# 2: init/adapter_config.json names the compressed base (1 named the uncompressed model). In the init key only:
# base entries (the expensive ones) stay hits
INIT_LAYOUT = 2
# How calibration text was chosen does not enter a key: the token ids themselves are hashed. Where an
# entry is computed or cached does not change it either.
_NOT_IN_BASE_KEY = {"cache_dir", "calib_dataset", "calib_task_dataset", "calib_task_format", "calib_task_fraction",
                    "calib_num_samples", "calib_seq_len", "calib_seed", "execution_device", "calib_activations_device",
                    "calib_batch_size", "merge", "merge_method", "merge_residual_rank", "merge_format"}
_NOT_IN_INIT_KEY = {"adapter_calib_dataset", "adapter_calib_num_samples", "adapter_calib_task_fraction"}


def base_key_parts(model: nn.Module, model_args: EoraModelConfig, compress_args: CompressionArguments,
                   calib: torch.Tensor | None, model_dir: str) -> dict:
    """What a compressed base depends on, as JSON-able values (hashed by :func:`eora_ft.run.cache.cache_key`).

    ``calib`` is the compressor's int64 ``[samples, seq_len]`` calibration (None for ``none``)."""
    commit = getattr(model.config, "_commit_hash", None)
    # the experts' calibration share matters only where there are experts: dense models' keys stay as they were
    left_out = _NOT_IN_BASE_KEY | (set() if expert_owners(model) else {"expert_min_share"})
    return {
        "kind": "base",
        "model": model_fingerprint(model_dir, commit),
        "dtype": str(next(model.parameters()).dtype),
        "compression": {k: v for k, v in dataclasses.asdict(compress_args).items() if k not in left_out},
        "calibration": None if calib is None else {"tokens": tensor_fingerprint(calib), "shape": list(calib.shape)},
        "targets": model_args.lora_target_modules,
    }


def init_key_parts(base_key: str, model_args: EoraModelConfig, init_args: AdapterInitArguments,
                   adapter_calib: torch.Tensor | None, seed: int, expert_min_share: float | None = None) -> dict:
    """What an initial adapter depends on: its base entry, the initializer, the LoRA shape, the adapter
    calibration tokens (int64 ``[samples, seq_len]``; None when the initializer reads none) and, for an
    initializer that draws random numbers, the seed (so the seeds of a comparison share the others).
    ``expert_min_share``: a mixture-of-experts model's (its adapter statistics depend on it; an imported base's
    key does not hold it); None for a dense model, whose keys stay as they were."""
    if init_args.init_from_adapter:  # an existing adapter: its files are the whole input
        return {"kind": "init", "layout": INIT_LAYOUT, "base": base_key,
                "from_adapter": model_fingerprint(init_args.init_from_adapter)}
    return {
        "kind": "init",
        "layout": INIT_LAYOUT,
        "base": base_key,
        "init": {**{k: v for k, v in dataclasses.asdict(init_args).items() if k not in _NOT_IN_INIT_KEY
                    # the refinement's knobs change nothing while it is off: entries made before a knob existed stay hits
                    and not (k.startswith("refine_") and not init_args.refine_steps)},
                 "options": init_args.options().get(init_args.init_method, {})},
        "calibration": None if adapter_calib is None else {"tokens": tensor_fingerprint(adapter_calib),
                                                           "shape": list(adapter_calib.shape)},
        "lora": {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
                 "targets": model_args.lora_target_modules},
        "seed": seed if init_args.init_method in SEEDED_INITS else None,
        **({"expert_min_share": expert_min_share} if expert_min_share is not None else {}),
    }


def build_base(directory: Path, model: nn.Module, tokenizer, calib: torch.Tensor | None, model_args: EoraModelConfig,
               compress_args: CompressionArguments, progress: bool = True,
               execution_device: torch.device | None = None, activations_device: torch.device | None = None) -> dict:
    """Compress ``model`` in place (one decoder layer at a time on ``execution_device``) and write ``base/``.

    Returns the entry's metadata (per-layer errors, calibration tokens, timings). For ``none`` nothing is
    compressed or written: the metadata names the model to load instead."""
    start = time.perf_counter()
    if compress_args.compress_method == UNCOMPRESSED:
        local = resolve_path(model_args.model_name_or_path)  # an absolute path: later runs may start elsewhere
        where = os.path.abspath(local) if os.path.exists(local) else model_args.model_name_or_path
        return {"uncompressed": {"model": where, "revision": model_args.model_revision},
                "calib_tokens": 0, "layers": [], "compress_seconds": 0.0, "compression": compress_args.describe()}
    compressor = make_compressor(compress_args.compress_method, **compress_args.compressor_options())
    result = compress_model(model, calib, compressor, [], target_modules=model_args.lora_target_modules,
                            batch_size=compress_args.calib_batch_size, true_sequential=compress_args.true_sequential,
                            progress=progress, execution_device=execution_device, activations_device=activations_device,
                            expert_min_share=compress_args.expert_min_share)
    save_compressed(model, directory / BASE_DIR, {**_compression_config(compress_args),
                                                  "calib_tokens": result.calib_tokens}, tokenizer=tokenizer)
    return {"calib_tokens": result.calib_tokens, "layers": result.layers, "compress_seconds": result.seconds,
            "expert_routing": result.expert_routing,
            "stage_seconds": result.stage_seconds, "build_seconds": time.perf_counter() - start,
            "compression": compress_args.describe()}


def build_init(directory: Path, base_entry: Path, original: Callable[[], nn.Module], tokenizer,
               adapter_calib: torch.Tensor | None, model_args: EoraModelConfig, compress_args: CompressionArguments,
               init_args: AdapterInitArguments, seed: int, progress: bool = True,
               execution_device: torch.device | None = None, activations_device: torch.device | None = None, *,
               entry: Path) -> dict:
    """Factor the initial adapter against ``base_entry``'s compressed linears and write ``init/``.

    ``original()`` returns the uncompressed model (on the CPU): the error ``W - W_c`` needs its weights, and
    the layer-by-layer pass over ``adapter_calib`` runs it with the compressed linears swapped in, so every
    layer's statistics come from the compressed prefix (:func:`eora_ft.run.initial_adapter.initial_adapter`).
    An initializer with its own base (LoftQ) also writes ``base/``. ``directory`` is where the entry is
    built, ``entry`` where it will live: the adapter names its base there (``entry/base`` or
    ``base_entry/base``; the original model for the uncompressed ceiling). Returns the entry's metadata."""
    start = time.perf_counter()
    if init_args.init_from_adapter:
        return _copy_adapter(directory, base_entry, init_args.init_from_adapter, compress_args, start)
    model = original()
    meta = {"base_entry": base_entry.name, "init": init_args.init_method, "compression": compress_args.describe()}
    if compress_args.compress_method == UNCOMPRESSED:  # plain LoRA: PEFT's own init, seeded
        torch.manual_seed(seed)
        config = lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                             model_args.lora_target_modules)
        save_adapter(build_lora_model(model, None, config), directory / INIT_DIR,
                     _uncompressed(base_entry)["model"])
        return meta | {"adapter_calib_tokens": 0, "layers": [], "init_seconds": {}}
    # read layer by layer as the driver reaches it: the whole packed base beside the uncompressed model would
    # add 35 GB to a 4-bit 70B run's 141 GB host peak
    modules = compressed_linears(base_entry / BASE_DIR, next(model.parameters()).dtype, model_args.lora_target_modules)

    def save_rewritten_base(rebased: nn.Module) -> None:  # LoftQ's Q_T: the adapter belongs to it, not the entry's
        save_compressed(rebased, directory / BASE_DIR, {**_compression_config(compress_args),
                                                        "rewritten_by": init_args.init_method}, tokenizer=tokenizer)

    initial = initial_adapter(model, modules, make_compressor(compress_args.compress_method,
                                                              **compress_args.compressor_options()),
                              adapter_calib, init_args, model_args, seed, batch_size=compress_args.calib_batch_size,
                              true_sequential=compress_args.true_sequential, calib_seed=compress_args.calib_seed,
                              expert_min_share=compress_args.expert_min_share,
                              save_rewritten_base=save_rewritten_base, execution_device=execution_device,
                              activations_device=activations_device, progress=progress)
    del modules
    base = (entry if initial.base_replaced else base_entry) / BASE_DIR
    save_adapter(initial.peft_model, directory / INIT_DIR, str(base.resolve()))
    return meta | initial.meta | {"build_seconds": time.perf_counter() - start}


def _copy_adapter(directory: Path, base_entry: Path, source: str, compress_args: CompressionArguments,
                  start: float) -> dict:
    """``init/`` = an existing PEFT adapter, checked against the entry's base (shapes), loaded by PEFT (its own
    ``lora_alpha / r`` scaling: a GPTQModel EoRA adapter has ``alpha = r``) and saved back as fp32 factors."""
    base = load_compressed(base_entry / BASE_DIR)
    # PEFT upcasts fp16 factors (GPTQModel writes fp16) to fp32 on load: they train as ours do
    peft_model = load_adapter(base, os.path.expanduser(source), is_trainable=True)
    config = peft_model.peft_config["default"]
    save_adapter(peft_model, directory / INIT_DIR, str((base_entry / BASE_DIR).resolve()))
    return {"base_entry": base_entry.name, "init": f"adapter {source}", "compression": compress_args.describe(),
            "adapter_calib_tokens": 0, "layers": [], "init_seconds": {}, "from_adapter": os.path.abspath(source),
            "lora": {"r": config.r, "alpha": config.lora_alpha}, "build_seconds": time.perf_counter() - start}


def export_base(init_entry: Path, directory: Path, tokenizer=None,
                dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """Put the base ``init_entry``'s adapter belongs to where the user owns it; returns ``(path, format)``.

    compressed-tensors ``pack-quantized`` when it can carry the base and plain transformers can load it
    (symmetric integer grids: then ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` works anywhere
    compressed-tensors is installed), else eora_ft's own format, hard-linked from the cache entry (no
    second copy on disk; :func:`eora_ft.adapters.peft_bridge.load_pretrained` loads it). The uncompressed ceiling
    exports nothing: its base is the original model, ``(its path or hub id, "plain")``. ``dtype``: the run's
    float dtype, which the exported scales, embeddings and norms (and ``config.dtype``) take."""
    from eora_ft.utils.atomic import atomic_directory
    from eora_ft.compress.ct_format import _is_ct_dir, export_compressed_tensors, unrepresentable
    from eora_ft.compress.io import COMPRESSION_CONFIG

    base = base_directory(init_entry)
    if base is None:
        return _uncompressed(init_entry.parent / read_meta(init_entry)["base_entry"])["model"], "plain"
    model = load_compressed(base, dtype=dtype)
    if unrepresentable(model) is None:
        export_compressed_tensors(model, directory, tokenizer=tokenizer)
        return str(Path(directory).resolve()), "compressed-tensors"
    owned = lambda d: _is_ct_dir(d) or (d / COMPRESSION_CONFIG).exists()  # noqa: E731 (a previous export)
    with atomic_directory(directory, owned, "compressed base (exported next to an adapter)") as tmp:
        for path in base.iterdir():
            try:
                os.link(path, tmp / path.name)  # the cache entry's files are immutable once sealed
            except OSError:  # another file system: copy
                shutil.copy2(path, tmp / path.name)
    return str(Path(directory).resolve()), "eora_ft"


def _compression_config(compress_args: CompressionArguments) -> dict:
    return {"method": compress_args.compress_method, **compress_args.compressor_options(),
            "description": compress_args.describe(), "true_sequential": compress_args.true_sequential,
            "expert_min_share": compress_args.expert_min_share}


def base_directory(init_entry: Path) -> Path | None:
    """The compressed model an init entry's adapter belongs to: its own ``base/`` (LoftQ), else its base
    entry's; None for the uncompressed ceiling."""
    if (init_entry / BASE_DIR).is_dir():
        return init_entry / BASE_DIR
    base_entry = init_entry.parent / json.loads((init_entry / META).read_text())["base_entry"]
    return None if _uncompressed(base_entry) else base_entry / BASE_DIR


def compressed_base_name(init_entry: Path, model_name_or_path: str) -> str:
    """What a run's ``compressed`` stage scores, as its summary names it: the packed base of ``init_entry``'s adapter
    (LoftQ's own), or the uncompressed model ``model_name_or_path`` for the ceiling."""
    return str(base_directory(init_entry) or f"{model_name_or_path} (uncompressed)")


def _uncompressed(base_entry: Path) -> dict | None:
    return json.loads((base_entry / META).read_text()).get("uncompressed")


def load_artifacts(init_entry: Path, dtype: torch.dtype, device: torch.device | str, trainable: bool = True,
                   attn_implementation: str | None = None):
    """The base of ``init_entry`` on ``device`` with its initial adapter (a PEFT model; LoRA trainable).

    The uncompressed ceiling's base is read straight onto ``device`` (every rank loads it: a CPU copy per
    rank first would be 8 x 16 GB of host memory for an 8B model on 8 GPUs). ``device="meta"``: the
    architecture only, nothing read (FSDP2's other ranks; the main process's weights are broadcast)."""
    base = base_directory(init_entry)
    if base is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        source = _uncompressed(init_entry.parent / json.loads((init_entry / META).read_text())["base_entry"])
        if torch.device(device).type == "meta":  # rotary frequencies (not saved) still computed on the CPU
            from accelerate import init_empty_weights

            config = AutoConfig.from_pretrained(source["model"], revision=source["revision"])
            with torch.device("cpu"), init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
            model.tie_weights()  # as from_pretrained leaves it: one head tensor under two names
        else:
            model = AutoModelForCausalLM.from_pretrained(source["model"], revision=source["revision"], dtype=dtype,
                                                         device_map={"": str(torch.device(device))},
                                                         attn_implementation=attn_implementation)
    else:
        model = load_compressed(base, dtype=dtype, device=device, attn_implementation=attn_implementation)
    return load_adapter(model, init_entry / INIT_DIR, is_trainable=trainable)
