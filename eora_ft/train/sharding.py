"""The packed base as FSDP2 shards it: codes, scales and zero points as frozen parameters.

:class:`~eora_ft.compress.linear.CompressedLinear` keeps its packed tensors in buffers, which every
layout replicates: DDP broadcasts them, DeepSpeed partitions parameters only, and ``fully_shard`` moves
a module's buffers to its device whole. FSDP2 shards parameters of any dtype (per-parameter DTensors,
``Shard(0)``, rows padded to a multiple of the world size; integer ones are never cast by its mixed
precision policy and travel as bytes in its all-gather), so before the Trainer wraps the model the
packed tensors are re-registered as parameters with ``requires_grad=False``. Their names, and so the
state_dict's keys, do not change; the optimizer never sees them (it takes trainable parameters only)
and checkpoints drop them (:mod:`eora_ft.train.adapter_trainer`).

Each decoder layer is one FSDP unit: its packed tensors are all-gathered before its forward (and again
before its backward under ``reshard_after_forward``) and freed after, so a GPU holds ``1/N`` of the
packed model plus the layers in flight. ``perm`` (an act-order import's ``[K]`` input order) stays a
buffer: it is small and every rank needs it whole.
"""

from __future__ import annotations

import logging

from torch import nn

from eora_ft.compress.linear import CompressedLinear

logger = logging.getLogger(__name__)

PACKED_TENSORS = ("qweight", "scales", "zeros", "values", "keep_bits")


def packed_as_parameters(model: nn.Module) -> int:
    """Re-register every :class:`CompressedLinear`'s packed buffers in ``model`` as frozen parameters, in place
    (same tensors, same names, same devices). Returns their bytes. Idempotent."""
    moved = 0
    for module in model.modules():
        if not isinstance(module, CompressedLinear):
            continue
        for name in PACKED_TENSORS:
            tensor = module._buffers.get(name)
            if tensor is None:
                continue
            del module._buffers[name]
            module._non_persistent_buffers_set.discard(name)
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            moved += tensor.numel() * tensor.element_size()
    if moved:
        logger.info("packed base: %.2f GB of codes, scales and zero points registered as frozen parameters, for "
                    "FSDP2 to shard", moved / 1e9)
    return moved


def packed_bytes_here(model: nn.Module) -> int:
    """Bytes of the packed tensors this rank holds: its local shards under FSDP2, the whole tensors otherwise."""
    from torch.distributed.tensor import DTensor

    total = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            for name in PACKED_TENSORS:
                tensor = getattr(module, name, None)
                if tensor is None:
                    continue
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                total += local.numel() * local.element_size()
    return total
