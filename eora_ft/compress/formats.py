"""Checkpoint formats by name: how a compressed model is written, and how any of them is read back.

``eora_ft`` is our own layout (every compressor, pruned layers included; :mod:`.io`), ``gptq`` the
GPTQ layout (AutoGPTQ, GPTQModel, vLLM; :mod:`.gptq_format`), ``compressed-tensors`` llm-compressor's
``pack-quantized`` (vLLM, transformers; :mod:`.ct_format`). :func:`import_model` tells them apart by
their files, so every command that reads a compressed model reads all three.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .ct_format import export_compressed_tensors, import_compressed_tensors
from .io import COMPRESSION_CONFIG, CONFIG, QUANTIZE_CONFIG, export_gptq, import_gptq, load_compressed, save_compressed

# name -> writer(model, directory, tokenizer=..., compression_config=...) -> Path
WRITERS: dict[str, Callable[..., Path]] = {
    "eora_ft": lambda model, directory, tokenizer=None, compression_config=None:
        save_compressed(model, directory, compression_config or {}, tokenizer=tokenizer),
    "gptq": lambda model, directory, tokenizer=None, compression_config=None:
        export_gptq(model, directory, tokenizer=tokenizer),
    "compressed-tensors": lambda model, directory, tokenizer=None, compression_config=None:
        export_compressed_tensors(model, directory, tokenizer=tokenizer),
}
READERS: dict[str, Callable[..., nn.Module]] = {
    "eora_ft": lambda directory, dtype, device: load_compressed(directory, dtype=dtype, device=device),
    "gptq": lambda directory, dtype, device: import_gptq(directory, dtype=dtype).to(device),
    "compressed-tensors": lambda directory, dtype, device: import_compressed_tensors(directory, dtype=dtype).to(device),
}


def detect_format(directory: str | os.PathLike) -> str:
    """The :data:`READERS` name of a compressed checkpoint directory; raises naming what was found."""
    directory = Path(directory)
    if (directory / COMPRESSION_CONFIG).is_file():
        return "eora_ft"
    quant = {}
    if (directory / CONFIG).is_file():
        quant = json.loads((directory / CONFIG).read_text()).get("quantization_config") or {}
    if not quant and (directory / QUANTIZE_CONFIG).is_file():
        quant = json.loads((directory / QUANTIZE_CONFIG).read_text())
    method = str(quant.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "gptq" or (directory / QUANTIZE_CONFIG).is_file():
        return "gptq"
    raise ValueError(f"{directory} is not a compressed checkpoint eora_ft reads: expected {COMPRESSION_CONFIG} "
                     f"(eora_ft), or a {CONFIG} whose quantization_config has quant_method 'gptq' or "
                     f"'compressed-tensors' (found quant_method={method or None!r})")


def import_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> nn.Module:
    """Load any compressed checkpoint eora_ft reads (format detected) as a model of :class:`CompressedLinear`
    layers on ``device``; float tensors in ``dtype``."""
    return READERS[detect_format(directory)](directory, dtype, device)
