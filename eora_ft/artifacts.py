"""Compression + initialization as cached artifacts: what the key covers, how an entry is built and loaded.

The main process builds (or finds) the entry; every rank then loads the packed base and the initial
adapter from it, so all ranks, and every rerun, train exactly the same starting point.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from eora_ft.compress import make_compressor
from eora_ft.compress.io import load_compressed, save_compressed
from eora_ft.compress.sequential import compress_model
from eora_ft.config import AdapterInitArguments, CompressionArguments, EoraModelConfig
from eora_ft.cache import model_fingerprint, tensor_fingerprint
from eora_ft.peft_bridge import build_lora_model, load_adapter, lora_config, save_adapter

BASE_DIR, INIT_DIR = "base", "init"
# Fields that do not change what is built (where it is cached or computed, how calibration text was
# chosen: the token ids themselves are hashed instead).
_NOT_IN_KEY = {"cache_dir", "calib_dataset", "calib_task_dataset", "calib_task_format", "calib_task_fraction",
               "calib_num_samples", "calib_seq_len", "calib_seed", "execution_device", "calib_activations_device"}


def key_parts(model: nn.Module, model_args: EoraModelConfig, compress_args: CompressionArguments,
              init_args: AdapterInitArguments, calib: torch.Tensor, seed: int, model_dir: str) -> dict:
    """Everything the artifacts depend on, as JSON-able values (hashed by :func:`eora_ft.cache.cache_key`)."""
    commit = getattr(model.config, "_commit_hash", None)
    return {
        "model": model_fingerprint(model_dir, commit),
        "dtype": str(next(model.parameters()).dtype),
        "compression": {k: v for k, v in dataclasses.asdict(compress_args).items() if k not in _NOT_IN_KEY},
        "calibration": {"tokens": tensor_fingerprint(calib), "shape": list(calib.shape)},
        "init": {**dataclasses.asdict(init_args), "options": init_args.options().get(init_args.init_method, {})},
        "lora": {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
                 "targets": model_args.lora_target_modules},
        "seed": seed,
    }


def build_artifacts(directory: Path, model: nn.Module, tokenizer, calib: torch.Tensor, model_args: EoraModelConfig,
                    compress_args: CompressionArguments, init_args: AdapterInitArguments, seed: int,
                    progress: bool = True, execution_device: torch.device | None = None,
                    activations_device: torch.device | None = None) -> dict:
    """Compress ``model`` in place, compute the initial factors, write ``base/`` and ``init/`` into ``directory``.

    ``model`` stays where it is (the CPU); each decoder layer moves to ``execution_device`` to be
    compressed (see :func:`eora_ft.compress.sequential.compress_model`). Returns the metadata of the
    entry: per-layer errors, calibration tokens, timings. ``model`` is left compressed and wrapped by
    PEFT: callers load the entry afresh instead of reusing it.
    """
    start = time.perf_counter()
    compressor = make_compressor(compress_args.compress_method, **compress_args.compressor_options())
    result = compress_model(model, calib, compressor, [init_args.init_method], rank=model_args.lora_r,
                            init_options=init_args.options(), target_modules=model_args.lora_target_modules,
                            batch_size=compress_args.calib_batch_size, seed=seed,
                            true_sequential=compress_args.true_sequential, factor_bits=init_args.factor_bits,
                            capture=init_args.capture, base_from=init_args.init_method, progress=progress,
                            execution_device=execution_device, activations_device=activations_device)
    save_compressed(model, directory / BASE_DIR,
                    {"method": compress_args.compress_method, **compress_args.compressor_options(),
                     "description": compress_args.describe(), "calib_tokens": result.calib_tokens},
                    tokenizer=tokenizer)
    factors = {path: per_init[init_args.init_method] for path, per_init in result.factors.items()}
    config = lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                         model_args.lora_target_modules)
    save_adapter(build_lora_model(model, factors, config, trim_to_effective_rank=init_args.trim_rank),
                 directory / INIT_DIR)
    return {"calib_tokens": result.calib_tokens, "layers": result.layers, "compress_seconds": result.seconds,
            "init_seconds": result.init_seconds, "build_seconds": time.perf_counter() - start,
            "compression": compress_args.describe(), "init": init_args.init_method}


def load_artifacts(entry: Path, dtype: torch.dtype, device: torch.device | str, trainable: bool = True):
    """The packed base of ``entry`` on ``device`` with its initial adapter (a PEFT model; LoRA trainable)."""
    model = load_compressed(entry / BASE_DIR, dtype=dtype, device=device)
    return load_adapter(model, entry / INIT_DIR, is_trainable=trainable)
