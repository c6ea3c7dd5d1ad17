"""Where a model computes, when it lives on the CPU and may not fit on the accelerator.

The uncompressed model is loaded on the CPU (as GPTQModel and llm-compressor do): compression moves
one decoder layer at a time to the accelerator (:mod:`eora_ft.init.sequential`). Evaluating it
needs the whole model on the accelerator, which an 8B model fits and a 70B one does not: then its
layers stream through accelerate's CPU-offload hooks, one module at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

FREE_MEMORY_SHARE = 0.8  # of the accelerator's free memory a whole model may take (the rest: activations)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (ties counted once)."""
    seen = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def fits_on(model: nn.Module, device: torch.device) -> bool:
    """True when ``model`` fits in :data:`FREE_MEMORY_SHARE` of ``device``'s free memory (always on a CPU)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return model_bytes(model) <= FREE_MEMORY_SHARE * free


@contextlib.contextmanager
def streamed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run ``model`` on ``device`` with its weights kept where they are, each module's copied there for its
    forward (accelerate ``cpu_offload``); the hooks are removed and the weights restored afterwards."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    cpu_offload(model, execution_device=device)
    try:
        yield model
    finally:
        remove_hook_from_module(model, recurse=True)


@contextlib.contextmanager
def placed_for_inference(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """The body runs ``model`` on ``device``: moved there whole when it fits, else streamed (:func:`streamed`);
    afterwards it is back where it was (the CPU), ready for layer-wise compression."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    home = next(model.parameters()).device
    if device == home:
        yield model
    elif fits_on(model, device):
        model.to(device)
        try:
            yield model
        finally:
            model.to(home)
    else:
        logger.info("the model (%.1f GB) does not fit on %s: evaluating it with its layers streamed from %s",
                    model_bytes(model) / 1e9, device, home)
        with streamed(model, device):
            yield model


def default_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
