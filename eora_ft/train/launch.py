"""How the training processes are launched and wrapped: one process per GPU, and DDP without a graph walk.

A recipe started with plain ``python`` on a host with several visible GPUs makes the Trainer wrap
the model in ``nn.DataParallel``, which copies the whole model, packed base included, to every GPU
on every step. :func:`refuse_data_parallel` stops that before any model loads.

Transformers turns DDP's ``find_unused_parameters`` on for any model that is not a
``PreTrainedModel`` (a PEFT model is not), which walks the autograd graph after every backward.
Every LoRA factor of a dense decoder takes part in every forward (dropout changes the input of the
LoRA branch, never whether it runs), so :func:`find_unused_parameters` says False there; adapters
on mixture-of-experts layers can miss a step (an expert no token was routed to) and keep it on.
"""

from __future__ import annotations

import os
import shlex
import sys

import torch
from torch import nn

# set by torchrun, accelerate launch, deepspeed and MPI launchers: the process is one rank of a launch
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                     "MPI_LOCALRANKID", "PMI_RANK")
# config attributes of mixture-of-experts models (Mixtral, Qwen-MoE, DeepSeek, OLMoE, ...)
EXPERT_COUNT_ATTRIBUTES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def refuse_data_parallel(argv: list[str] | None = None, use_cpu: bool = False,
                         environ: dict | None = None) -> None:
    """Raise when this process would train with ``nn.DataParallel``: several GPUs visible, no launcher.

    ``argv`` (default ``sys.argv``) is the command that was run; the error shows it rewritten for
    ``accelerate launch``. Call it before any model loads. ``use_cpu``: the run trains on the CPU
    (no DataParallel then).
    """
    environ = os.environ if environ is None else environ
    if use_cpu or any(name in environ for name in LAUNCHER_VARIABLES):
        return
    gpus = torch.cuda.device_count()
    if gpus <= 1:
        return
    argv = list(sys.argv if argv is None else argv)
    target = argv[0] if argv and argv[0].endswith(".py") else "-m eora_ft.cli"  # a console script: its module
    rest = shlex.join(argv[1:])
    command = f"{target} {rest}".strip()
    raise RuntimeError(
        f"{gpus} GPUs are visible but this process was started without a launcher: the Trainer would use "
        "nn.DataParallel and copy the whole model, packed base included, to every GPU on every step. Run one "
        f"process per GPU instead:\n  accelerate launch --multi_gpu --num_processes {gpus} {command}\n"
        f"(or accelerate launch --config_file accelerate_configs/multi_gpu.yaml ..., or a DeepSpeed config), or use "
        f"one GPU:\n  CUDA_VISIBLE_DEVICES=0 python {command}")


def find_unused_parameters(model: nn.Module) -> bool:
    """Whether DDP must look for parameters that got no gradient in a step: True only for mixture-of-experts.

    ``model``: the PEFT model about to train (its config and module names are read).
    """
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "text_config", None)]
    if any((getattr(c, name, None) or 0) > 1 for c in configs if c is not None for name in EXPERT_COUNT_ATTRIBUTES):
        return True
    return any(p.requires_grad and ".experts." in f".{name}." for name, p in model.named_parameters())
