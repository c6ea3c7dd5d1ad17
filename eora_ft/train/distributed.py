"""Process-group setup that really gives N ranks, on GPUs and on a GPU-less host.

On a CUDA machine Accelerate and the Trainer set everything up themselves. Without CUDA, two
Accelerate 1.15 behaviours (measured, ``../shared/PLATFORM.md``) make a multi-process launch quietly
run N copies of a 1-process job: a ``MULTI_GPU`` launch with ``use_cpu`` gives every rank
``rank 0 of 1``, and so does ``--use_deepspeed``. What works is creating the process state
ourselves, before the Trainer does (``PartialState(cpu=True)`` for DDP over gloo,
``PartialState(backend="gloo")`` for DeepSpeed, which ``cpu=True`` would silently drop; ``cpu=True`` for FSDP2,
its state then marked MULTI_GPU so that Accelerate turns it into FSDP), and
telling the Trainer to use it (``accelerator_config.use_configured_state``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from datetime import timedelta
from typing import Iterator

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, str_to_bool

logger = logging.getLogger(__name__)


def deepspeed_requested() -> bool:
    """True when launched with a DeepSpeed config (``accelerate launch --use_deepspeed`` or a DEEPSPEED yaml)."""
    return bool(str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")))


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage the launcher asked for, or None outside DeepSpeed."""
    if not deepspeed_requested():
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def fsdp2_requested() -> bool:
    """True when launched with an FSDP2 config (``accelerate launch`` with ``fsdp_version: 2``, e.g.
    ``accelerate_configs/fsdp2.yaml``). FSDP1 is not supported: it cannot shard integer parameters."""
    if not str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"FSDP_VERSION={version}: eora_ft trains under FSDP2 only (fsdp_version: 2, as in "
                         "accelerate_configs/fsdp2.yaml); FSDP1 flattens parameters and refuses the packed integer "
                         "codes ('Integer parameters are unsupported')")
    return True


def fsdp2_broadcasts_weights() -> bool:
    """True under an FSDP2 launch with ``fsdp_cpu_ram_efficient_loading``: Accelerate broadcasts the main
    process's weights to the other ranks' meta-device models as it shards them (the shipped fsdp2.yaml)."""
    return fsdp2_requested() and bool(str_to_bool(os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")))


# the first Accelerate whose FSDP2 optimizer swap keys meta-device parameters by identity: before it, parameters
# built on the meta device all share data_ptr 0 and the optimizer is silently bound to the wrong shards
META_MODELS_ACCELERATE = "1.16.0"


def meta_models_supported() -> bool:
    """Whether ranks may build their model on the meta device for FSDP2 (Accelerate >= 1.16.0)."""
    import accelerate
    from packaging.version import Version

    return Version(accelerate.__version__) >= Version(META_MODELS_ACCELERATE)


def skip_deepspeed_shm_op() -> None:
    """Stop DeepSpeed from JIT-building its shared-memory CPU op (~100 s, only a speed-up for CPU all-reduce).

    The function must be replaced in the module object itself: ``import deepspeed.comm.torch as m``
    binds ``torch`` (the package re-exports it), not the module.
    """
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    module = sys.modules["deepspeed.comm.torch"]
    module.build_shm_op = lambda: None


def configure_cpu_process_state(timeout: timedelta | None = None) -> PartialState | None:
    """Create the gloo process state on a GPU-less host; return None (and do nothing) when CUDA exists.

    Must run before ``TrainingArguments`` sets up its devices; :class:`eora_ft.config.EoraSFTConfig`
    calls it from ``__post_init__``. ``timeout`` bounds every collective (the Trainer passes
    ``ddp_timeout`` on GPUs; here it is ours to pass). Idempotent.
    """
    if torch.cuda.is_available():
        return None
    if PartialState._shared_state:
        return PartialState()
    options = {} if timeout is None else {"timeout": timeout}
    if deepspeed_requested():  # cpu=True would make it a MULTI_CPU run, silently without DeepSpeed
        skip_deepspeed_shm_op()
        return PartialState(backend="gloo", **options)
    state = PartialState(cpu=True, **options)
    if fsdp2_requested() and state.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate makes a launch FSDP only from an accelerator's multi-process state (MULTI_GPU, ...), never
        # from MULTI_CPU, and without cpu=True it gives every rank `rank 0 of 1`: the gloo group is created as for
        # DDP, and the state the Accelerator copies is marked MULTI_GPU so that it turns it into FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return state


def describe_state(state: PartialState) -> str:
    """One log line: rank, world size, backend and device."""
    kind = "deepspeed" if deepspeed_requested() else "fsdp2" if fsdp2_requested() else \
        str(state.distributed_type).split(".")[-1].lower()
    return (f"rank {state.process_index} of {state.num_processes} ({kind}, backend={state.backend}, "
            f"device={state.device})")


@contextlib.contextmanager
def full_model_init() -> Iterator[None]:
    """Build models whole on this process even under a ZeRO-3 launch.

    Parsing the SFTConfig of a ZeRO-3 launch registers a DeepSpeed config with transformers, which
    then builds every model inside ``deepspeed.zero.Init`` (a collective): the main process loading
    the uncompressed model alone would deadlock. eora_ft loads models itself and lets the Trainer's
    ``deepspeed.initialize`` shard the float parameters (packed integer buffers stay replicated).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def is_zero3_partitioned(parameter) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 has sharded (its local ``data`` is a placeholder)."""
    return hasattr(parameter, "ds_id")


def is_fsdp2_sharded(parameter) -> bool:
    """True for a parameter that FSDP2 (``fully_shard``) has sharded: a DTensor."""
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


def gather_trainable(model) -> dict | None:
    """Full copies (CPU) of the trainable parameters of a ZeRO-3- or FSDP2-sharded model, by name; None if not
    sharded.

    A collective: every rank must call it. FSDP2 parameters are gathered one at a time, so a rank holds one
    full adapter factor beside its shards at most.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if any(is_fsdp2_sharded(p) for p in params.values()):
        return {name: (p.full_tensor() if is_fsdp2_sharded(p) else p).detach().cpu().clone()
                for name, p in params.items()}
    if not any(is_zero3_partitioned(p) for p in params.values()):
        return None
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().cpu().clone() for name, p in params.items()}


@contextlib.contextmanager
def all_cores_while_others_wait(state: PartialState) -> Iterator[None]:
    """On a multi-rank CPU run, let the main process use every rank's threads for main-only work.

    Evaluation and compression run on the main process while the other ranks block in a barrier
    (idle, not spinning); the launcher gave each rank ``cores / ranks`` threads.
    """
    if state.device.type != "cpu" or state.num_processes == 1 or not state.is_main_process:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, min(os.cpu_count() or before, before * state.num_processes)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
