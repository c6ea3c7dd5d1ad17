"""Where each rank builds the model it trains, and the unsharded copy the main process evaluates afterwards.

DDP and DeepSpeed: every rank loads the entry on its own device. FSDP2: on the CPU, from which ``fully_shard``
moves this rank's 1/N of the packed base to its GPU one decoder layer at a time (a whole 70B base would not fit);
with ``fsdp_cpu_ram_efficient_loading`` the ranks other than the main one build the architecture on the meta
device and read nothing (Accelerate broadcasts the main process's weights as it shards), so the node's host holds
one copy instead of one per rank (the uncompressed ceiling's too).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import accelerate
import torch
from accelerate import PartialState

from eora_ft.run.artifacts import base_directory, load_artifacts
from eora_ft.train.distributed import (
    META_MODELS_ACCELERATE,
    fsdp2_broadcasts_weights,
    fsdp2_requested,
    full_model_init,
    meta_models_supported,
)
from eora_ft.train.sharding import warn_host_memory

logger = logging.getLogger("eora_ft")


def one_copy_per_node() -> bool:
    """Whether an FSDP2 launch reads the weights once per node (the main process; the others build on meta)."""
    return fsdp2_requested() and fsdp2_broadcasts_weights() and meta_models_supported()


def training_home(state: PartialState, entry: Path) -> torch.device:
    """Where this rank loads the model it trains (see the module docstring); under FSDP2 the node's local main
    process first warns when the host cannot hold the copies the node reads."""
    if not fsdp2_requested():
        return state.device
    base = base_directory(entry)
    if state.is_local_main_process and base is not None:
        copies = 1 if one_copy_per_node() else int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        warn_host_memory(sum(f.stat().st_size for f in base.glob("*.safetensors")), copies)
    if state.is_main_process:
        return torch.device("cpu")
    if one_copy_per_node():
        logger.info("FSDP2: this rank builds the model on the meta device and reads no weights; the main process "
                    "broadcasts them as the Trainer shards the model")
        return torch.device("meta")
    if fsdp2_broadcasts_weights():
        logger.warning("FSDP2: accelerate %s binds the optimizer of a model built on the meta device to the wrong "
                       "parameters (fixed in %s): this rank reads its own copy of the weights instead (host memory: "
                       "one copy per rank). Upgrade accelerate to load them once per node", accelerate.__version__,
                       META_MODELS_ACCELERATE)
    return torch.device("cpu")


def unsharded_copy(entry: Path, dtype: torch.dtype, device: torch.device, trained: dict,
                   attn_implementation: str | None = None):
    """The entry's model with the gathered trained factors of a ZeRO-3 or FSDP2 run copied in (main process)."""
    with full_model_init():
        peft_model = load_artifacts(entry, dtype, device, attn_implementation=attn_implementation)
    missing = set(trained) - {n for n, p in peft_model.named_parameters() if p.requires_grad}
    if missing:
        raise RuntimeError(f"trained parameters {sorted(missing)[:3]} have no match in the reloaded model")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name in trained:
                param.copy_(trained[name])
    return peft_model
