"""The float dtype a model is loaded in, from the ``dtype`` setting and where it will compute.

``auto`` (the default) is the checkpoint's own dtype (``config.dtype``: bf16 for Llama-3) when the run computes
on an accelerator, and fp32 on a CPU: CPUs without AMX run bf16 matmuls several times slower than fp32, and the
bundled nano model's recorded values are fp32. TRL's own default (``float32``) would load a 70B model in 282 GB
of host memory and unpack and multiply in fp32 on the GPU.
"""

from __future__ import annotations

import os

import torch

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def checkpoint_dtype(source: str | os.PathLike, revision: str | None = None) -> torch.dtype:
    """The dtype ``source`` (local directory or hub id) records in its ``config.json``; fp32 when it records none."""
    from transformers import AutoConfig

    recorded = getattr(AutoConfig.from_pretrained(source, revision=revision), "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded.removeprefix("torch."), None)
    return recorded if isinstance(recorded, torch.dtype) and recorded.is_floating_point else torch.float32


def model_dtype(setting: str | None, source: str | os.PathLike, device: torch.device | str,
                revision: str | None = None) -> torch.dtype:
    """The dtype to load ``source`` in: ``setting`` (one of :data:`MODEL_DTYPES`; None means ``auto``) resolved
    for ``device``, the device the model computes on (not where it is stored)."""
    if setting not in (*MODEL_DTYPES, None):
        raise ValueError(f"dtype={setting!r} is unknown; valid: {list(MODEL_DTYPES)}")
    if setting not in ("auto", None):
        return getattr(torch, setting)
    if torch.device(device).type == "cpu":
        return torch.float32
    return checkpoint_dtype(source, revision)
