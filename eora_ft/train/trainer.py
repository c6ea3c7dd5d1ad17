"""Fine-tune only the LoRA adapters of a compressed model with TRL's SFTTrainer."""

from __future__ import annotations

import gc
import logging
import math
import os

import datasets
import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from eora_ft.adapters.peft_bridge import trainable_summary

logger = logging.getLogger(__name__)


def train_adapters(model: nn.Module, tokenizer, train_dataset: datasets.Dataset, args: SFTConfig,
                   eval_dataset: datasets.Dataset | None = None) -> SFTTrainer:
    """Run SFT on a prompt/completion dataset (loss on the completion only) and return the trainer.

    ``model`` is a PEFT model whose only trainable parameters are LoRA factors (checked before the
    first step). A rerun with the same ``output_dir`` resumes from its last checkpoint.
    """
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer)
    counts = trainable_summary(trainer.model)
    logger.info("trainable parameters: %d of %d (%.3f%%): LoRA adapters only",
                counts["trainable"], counts["total"], 100 * counts["trainable"] / counts["total"])
    logger.info("training backend: %s", training_backend(trainer))
    last = last_complete_checkpoint(args.output_dir)
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    return trainer


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written to the end, or None.

    The Trainer writes a checkpoint in place, ``trainer_state.json`` last; a run killed while saving
    leaves a directory without it, which resuming from would crash on (or silently restart).
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(name.split("-")[-1]), name) for name in os.listdir(output_dir)
                   if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.split("-")[-1].isdigit())
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
        logger.warning("skipping %s: incomplete (no trainer_state.json; the run stopped while saving it)", path)
    return None


def loss_history(trainer: SFTTrainer, key: str = "loss") -> list[dict]:
    """``[{"step", "loss"}]`` of the logged ``key`` (``loss`` for training, ``eval_loss`` for evaluation)."""
    return [{"step": e["step"], "loss": e[key]} for e in trainer.state.log_history if key in e]


def training_backend(trainer: SFTTrainer) -> str:
    """What the Trainer really runs on, e.g. ``deepspeed zero-3 x2``, ``multi_cpu x2`` or ``single process``."""
    state = trainer.accelerator.state
    if trainer.is_deepspeed_enabled:
        stage = state.deepspeed_plugin.zero_stage
        return f"deepspeed zero-{stage} x{state.num_processes}"
    if state.num_processes == 1:
        return "single process"
    return f"{str(state.distributed_type).split('.')[-1].lower()} x{state.num_processes}"


def training_summary(trainer: SFTTrainer) -> dict:
    """What the results record of a finished trainer: ``train steps``, ``trainable parameters``, ``training
    backend``, ``train_loss`` and ``eval_loss`` curves (taken before :func:`release_training_state`)."""
    return {"train steps": trainer.state.global_step,
            "trainable parameters": trainable_summary(trainer.model)["trainable"],
            "training backend": training_backend(trainer),
            "train_loss": loss_history(trainer), "eval_loss": loss_history(trainer, "eval_loss")}


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
