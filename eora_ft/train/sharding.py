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

import copy
import dataclasses
import logging

import torch
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
            if name == "keep_bits":  # decided once, here: FSDP2 re-allocates the gathered mask on every forward
                module.freeze_two_four()
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


def fsdp2_training_args(args):
    """A copy of the Trainer's ``args`` for FSDP2: gradients reduce-scattered after every micro-batch
    (``sync_each_batch``), so accumulation adds into the sharded fp32 gradients; without it FSDP2 keeps each
    factor's whole unsharded gradient between micro-batches, in the compute dtype."""
    args = copy.copy(args)
    kwargs = dict(args.accelerator_config.gradient_accumulation_kwargs or {}, sync_each_batch=True)
    args.accelerator_config = dataclasses.replace(args.accelerator_config, gradient_accumulation_kwargs=kwargs)
    return args


def reduce_in_fp32(trainer) -> None:
    """Under bf16/fp16 mixed precision Accelerate gives FSDP2 ``reduce_dtype`` = the compute dtype: gradients
    would be averaged over the ranks in bf16. Keep the compute dtype for the gathered weights and reduce in fp32
    (DDP's precision). Call after the Trainer exists and before it trains (the policy is read when the model is
    wrapped)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = trainer.accelerator.state.fsdp_plugin
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is None or policy.param_dtype in (None, torch.float32) or policy.reduce_dtype == torch.float32:
        return
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32,
                                                         output_dtype=policy.output_dtype,
                                                         cast_forward_inputs=policy.cast_forward_inputs)
    logger.info("FSDP2 mixed precision: weights gathered in %s, gradients reduced in fp32", policy.param_dtype)


def warn_host_memory(model_bytes: int, local_processes: int) -> bool:
    """Before every rank of a node loads the base onto its CPU (FSDP2): warn when ``local_processes`` copies of
    ``model_bytes`` exceed the host memory available now. Returns whether it warned."""
    import psutil

    need, available = model_bytes * local_processes, psutil.virtual_memory().available
    if need <= available:
        return False
    logger.warning("FSDP2: each of the %d processes on this node reads the base (%.1f GB) onto its CPU before "
                   "fully_shard moves its 1/%d to its GPU: %.1f GB in all, %.1f GB available. Use fewer processes "
                   "per node, or a node with more host memory", local_processes, model_bytes / 1e9, local_processes,
                   need / 1e9, available / 1e9)
    return True
