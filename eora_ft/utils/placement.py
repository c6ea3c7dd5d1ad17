"""Where a model computes, when it lives on the CPU and may not fit on the accelerator.

The uncompressed model is loaded on the CPU (as GPTQModel and llm-compressor do): compression moves
one decoder layer at a time to the accelerator (:mod:`eora_ft.init.sequential`). Evaluating it
needs the whole model on the accelerator, which an 8B model fits and a 70B one does not. Then, when the
node's GPUs hold it together (a 70B bf16 model on two or more 80 GB GPUs), its layers are spread over them
(accelerate's ``dispatch_model``: each GPU runs its own layers, nothing crosses PCIe but activations); only
when they do not does it stream through accelerate's CPU-offload hooks, one module at a time, its whole
weight over PCIe on every forward (:func:`streaming_note` says what that costs).
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


def accelerator_budgets() -> dict[int, int]:
    """``{GPU index: bytes}`` a model may take on each visible GPU (:data:`FREE_MEMORY_SHARE` of its free memory);
    empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    return {i: int(FREE_MEMORY_SHARE * torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}


def spread_map(model: nn.Module, budgets: dict[int, int]) -> dict[str, int] | None:
    """accelerate's device map putting ``model``'s modules on the GPUs of ``budgets`` (``{index: bytes}``, at least
    two), decoder layers whole; None when they do not hold it all together."""
    if len(budgets) < 2 or model_bytes(model) > sum(budgets.values()):
        return None
    from accelerate.utils import infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory={**budgets, "cpu": 0},
                                       no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    return device_map if device_map and all(isinstance(d, int) for d in device_map.values()) else None


@contextlib.contextmanager
def spread(model: nn.Module, device_map: dict[str, int]) -> Iterator[nn.Module]:
    """Run ``model`` with its modules on the GPUs of ``device_map`` (accelerate ``dispatch_model``); afterwards the
    hooks are removed and the weights are back where they were."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    home = next(model.parameters()).device
    dispatch_model(model, device_map=device_map)
    try:
        yield model
    finally:
        remove_hook_from_module(model, recurse=True)
        model.to(home)


def _resolved(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def placement(model: nn.Module, device: torch.device | str) -> tuple[str, dict | None]:
    """How :func:`placed_for_inference` will run ``model`` (on the CPU) on ``device``: ``("resident" | "moved" |
    "spread" | "streamed", the device map when spread)``."""
    device = _resolved(device)
    if device == next(model.parameters()).device:
        return "resident", None
    if fits_on(model, device):
        return "moved", None
    device_map = spread_map(model, accelerator_budgets())
    return ("spread", device_map) if device_map is not None else ("streamed", None)


def streaming_note(model: nn.Module, device: torch.device | str) -> str:
    """What streaming ``model`` to ``device`` costs: its bytes cross PCIe on every forward (~25 GB/s on PCIe 4)."""
    size = model_bytes(model) / 1e9
    return (f"the model ({size:.0f} GB) fits neither on {device} nor across this node's GPUs: every forward copies "
            f"its {size:.0f} GB over PCIe (about {size / 25:.0f} s at 25 GB/s)")


@contextlib.contextmanager
def placed_for_inference(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """The body runs ``model`` on ``device``: moved there whole when it fits, spread over the node's GPUs when
    they hold it together (:func:`spread`), else streamed (:func:`streamed`); afterwards it is back where it was
    (the CPU), ready for layer-wise compression."""
    device = _resolved(device)
    home = next(model.parameters()).device
    how, device_map = placement(model, device)
    if how == "resident":
        yield model
    elif how == "moved":
        model.to(device)
        try:
            yield model
        finally:
            model.to(home)
    elif how == "spread":
        logger.info("the model (%.1f GB) does not fit on %s: evaluating it spread over GPUs %s",
                    model_bytes(model) / 1e9, device, sorted(set(device_map.values())))
        with spread(model, device_map):
            yield model
    else:
        logger.warning("%s; evaluating it streamed from %s", streaming_note(model, device), home)
        with streamed(model, device):
            yield model


def default_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
