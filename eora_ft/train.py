"""Fine-tune only the LoRA adapters of a compressed model with TRL's SFTTrainer."""

from __future__ import annotations

import logging
import os

import datasets
from torch import nn
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from eora_ft.peft_bridge import trainable_summary

logger = logging.getLogger(__name__)


def train_adapters(model: nn.Module, tokenizer, train_dataset: datasets.Dataset, args: SFTConfig) -> SFTTrainer:
    """Run SFT on a prompt/completion dataset (loss on the completion only) and return the trainer.

    ``model`` is a PEFT model whose only trainable parameters are LoRA factors (checked before the
    first step). A rerun with the same ``output_dir`` resumes from its last checkpoint.
    """
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    counts = trainable_summary(trainer.model)
    logger.info("trainable parameters: %d of %d (%.3f%%): LoRA adapters only",
                counts["trainable"], counts["total"], 100 * counts["trainable"] / counts["total"])
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    return trainer


def loss_history(trainer: SFTTrainer) -> list[dict]:
    """``[{"step", "loss"}]`` of the logged training losses."""
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
