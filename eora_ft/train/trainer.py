"""Fine-tune only the LoRA adapters of a compressed model with TRL's SFTTrainer."""

from __future__ import annotations

import copy
import gc
import logging
import math
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from torch import nn
from trl import SFTConfig, SFTTrainer

from eora_ft.adapters.peft_bridge import trainable_summary
from eora_ft.compress.experts import ExpertLinears, expert_owners
from eora_ft.train.adapter_trainer import AdapterSFTTrainer
from eora_ft.train.checkpoints import agree_on_resume, last_complete_checkpoint  # noqa: F401 (re-exported)
from eora_ft.train.distributed import fsdp2_requested
from eora_ft.train.launch import find_unused_parameters, refuse_data_parallel
from eora_ft.train.sharding import fsdp2_training_args, packed_as_parameters, reduce_in_fp32

logger = logging.getLogger(__name__)


def train_adapters(model: nn.Module, tokenizer, train_dataset: datasets.Dataset, args: SFTConfig,
                   eval_dataset: datasets.Dataset | None = None) -> SFTTrainer:
    """Run SFT on a prompt/completion dataset (loss on the completion only) and return the trainer.

    ``model`` is a PEFT model whose only trainable parameters are LoRA factors (checked before the
    first step). A rerun with the same ``output_dir`` resumes from its last checkpoint, the same one on
    every rank (:func:`~eora_ft.train.checkpoints.agree_on_resume`; an ``output_dir`` some ranks cannot
    see is refused unless ``save_on_each_node``). Checkpoints hold the adapters, optimizer, scheduler and
    RNG/trainer state, never the packed base. ``args.ddp_find_unused_parameters`` left unset (None)
    becomes False for the Trainer unless the model has mixture-of-experts layers (``args`` is not changed).
    Under FSDP2 the packed base becomes frozen parameters first (:mod:`eora_ft.train.sharding`), so the
    Trainer's ``fully_shard`` shards it (the model is sharded in place when this returns); gradients are
    reduce-scattered after every micro-batch and, under mixed precision, in fp32.
    """
    if args.n_gpu > 1:  # the recipes refuse this before loading anything; a caller of this function may not
        refuse_data_parallel(use_cpu=args.use_cpu)
    if args.ddp_find_unused_parameters is None:  # read when the Trainer builds its Accelerator, just below
        # on a copy: the caller's args are the run's recorded config (compare --resume matches it)
        args = copy.copy(args)
        args.ddp_find_unused_parameters = find_unused_parameters(model)
    # decided before the Trainer exists: a refusal here costs nothing, and every rank refuses together
    resume = agree_on_resume(PartialState(), args.output_dir, args.save_on_each_node,
                             saves_checkpoints=args.save_strategy != "no")
    mark_expert_blocks_for_zero3(model)
    sharded = fsdp2_requested()
    if sharded:
        packed_as_parameters(model)
        args = fsdp2_training_args(args)
    trainer = AdapterSFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                processing_class=tokenizer)
    if sharded:
        reduce_in_fp32(trainer)
    counts = trainable_summary(trainer.model)
    logger.info("trainable parameters: %d of %d (%.3f%%): LoRA adapters only",
                counts["trainable"], counts["total"], 100 * counts["trainable"] / counts["total"])
    logger.info("training backend: %s (ddp_find_unused_parameters=%s)", training_backend(trainer),
                args.ddp_find_unused_parameters)
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def mark_expert_blocks_for_zero3(model: nn.Module) -> bool:
    """Make each mixture-of-experts block a ZeRO-3 leaf: its parameters are gathered together when the block runs.
    Otherwise ZeRO-3 gathers per expert as the forward reaches it, and ranks whose tokens reach different experts
    (evaluation, where only routed experts run) would wait in different collectives. Marks only (harmless without
    ZeRO-3); returns whether there was a block to mark."""
    if not expert_owners(model):
        return False
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError:  # no DeepSpeed, no ZeRO-3
        return False
    set_z3_leaf_modules(model, [ExpertLinears])
    return True


def loss_history(trainer: SFTTrainer, key: str = "loss") -> list[dict]:
    """``[{"step", "loss"}]`` of the logged ``key`` (``loss`` for training, ``eval_loss`` for evaluation)."""
    return [{"step": e["step"], "loss": e[key]} for e in trainer.state.log_history if key in e]


def training_backend(trainer: SFTTrainer) -> str:
    """What the Trainer really runs on, e.g. ``deepspeed zero-3 x2``, ``fsdp2 x2``, ``multi_cpu x2`` or ``single
    process``."""
    state = trainer.accelerator.state
    if trainer.is_deepspeed_enabled:
        stage = state.deepspeed_plugin.zero_stage
        return f"deepspeed zero-{stage} x{state.num_processes}"
    if trainer.is_fsdp_enabled:
        return f"fsdp{state.fsdp_plugin.fsdp_version} x{state.num_processes}"
    if state.num_processes == 1:
        return "single process"
    return f"{str(state.distributed_type).split('.')[-1].lower()} x{state.num_processes}"


def training_summary(trainer: SFTTrainer) -> dict:
    """What the results record of a finished trainer: ``train steps``, ``trainable parameters``, ``training
    backend``, ``train_loss`` and ``eval_loss`` curves, and ``best`` (``{"step", "eval_loss"}`` of the checkpoint
    ``load_best_model_at_end`` restored, the adapter the run then evaluates and saves; None without it) and
    ``reported adapter`` (that, in words). Taken
    before :func:`release_training_state`."""
    state = trainer.state
    best = None
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint is not None:
        # the step of the checkpoint the Trainer loaded back, read from its name (best_global_step is 0 = falsy
        # for the initial adapter, which the Trainer itself never ranks)
        step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
        logged = [e["eval_loss"] for e in state.log_history if e.get("step") == step and "eval_loss" in e]
        best = {"step": step, "eval_loss": logged[-1] if logged else state.best_metric}
    return {"train steps": state.global_step,
            "trainable parameters": trainable_summary(trainer.model)["trainable"],
            "training backend": training_backend(trainer),
            "train_loss": loss_history(trainer), "eval_loss": loss_history(trainer, "eval_loss"), "best": best,
            "reported adapter": "the last step's" if best is None else
            f"step {best['step']}'s (lowest eval loss, {best['eval_loss']:.4f}; load_best_model_at_end)"}


def release_training_state(trainer) -> None:
    """Drop the trainer's model, optimizer and DeepSpeed engine (main process, after a ZeRO-3 run).

    The engine keeps the packed base replicated on every GPU; the unsharded copy evaluated next would
    otherwise sit beside it (a 70B 4-bit base: ~35 GB twice on one GPU)."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    handler = trainer.callback_handler  # holds the model and optimizer for the callbacks
    handler.model = handler.optimizer = handler.lr_scheduler = None
    if hasattr(trainer, "deepspeed"):
        trainer.deepspeed = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def divergence(curve: list[dict], patience: int = 3) -> str | None:
    """Why a training-loss curve (``[{"step", "loss"}]``, as :func:`loss_history` gives) diverged, or None.

    Diverged: a logged loss that is NaN or infinite, or ``patience`` consecutive logged losses after the
    first all above the first one (the optimizer made the adapter worse than where it started and kept it
    there). ``patience <= 0`` checks only for non-finite losses."""
    for point in curve:
        if not math.isfinite(point["loss"]):
            return f"non-finite loss ({point['loss']}) at step {point['step']}"
    if patience <= 0 or len(curve) < patience + 1:
        return None
    start, above = curve[0]["loss"], 0
    for point in curve[1:]:
        above = above + 1 if point["loss"] > start else 0
        if above >= patience:
            return f"loss above its start ({start:.4f}) for {patience} logged steps, up to step {point['step']}"
    return None
