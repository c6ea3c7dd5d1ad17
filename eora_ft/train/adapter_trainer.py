"""TRL's SFTTrainer whose checkpoints hold the adapters' state and nothing of the frozen base.

The packed codes and scales are buffers of :class:`~eora_ft.compress.linear.CompressedLinear`, and a
module's state_dict carries its persistent buffers. PEFT's ``save_pretrained`` filters them out, but
DeepSpeed does not: ``engine.save_checkpoint`` writes ``module.state_dict()`` whole (its
``exclude_frozen_parameters`` drops the frozen parameters ``named_parameters`` lists, never buffers,
nor a tied output head, which it lists only under the embedding's name), under ZeRO-3 from every
rank, and ZeRO-3's 16-bit consolidation copies every buffer to rank 0's host before PEFT filters
it: ~4 GB per save at 8B, ~35 GB per rank at 70B. No run reads the base back from a checkpoint (it
is rebuilt from the artifact cache), so while a checkpoint is written every buffer is non-persistent
(which each of those writers honours) and the model's state_dict holds its trainable parameters
only. Loading is unaffected: PEFT and DeepSpeed load a PEFT model non-strictly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from torch import nn
from trl import SFTTrainer


@contextlib.contextmanager
def only_trainable_in_state_dict(model: nn.Module) -> Iterator[None]:
    """For the duration, ``model.state_dict()`` holds its trainable parameters only, and every buffer of
    every submodule is non-persistent (for the writers that walk the modules themselves). Nestable."""
    added = []
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                module._non_persistent_buffers_set.add(name)
                added.append((module, name))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def drop_frozen(module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in trainable]:
            del state_dict[key]

    handle = model.register_state_dict_post_hook(drop_frozen)
    try:
        yield
    finally:
        handle.remove()
        for module, name in added:
            module._non_persistent_buffers_set.discard(name)


class AdapterSFTTrainer(SFTTrainer):
    """SFTTrainer for a PEFT model over a frozen compressed base: checkpoints hold no part of the base.

    With ``load_best_model_at_end`` and ``eval_on_start`` the initial adapter (step 0) is a candidate too: the
    Trainer ranks only the evaluations it runs after a step, so a run whose training only made the validation
    loss worse would still return a trained step. Here the start evaluation is ranked as well, and saved as
    ``checkpoint-0`` when it leads, so the run returns the initial adapter unless a step beats it."""

    def _evaluate(self, trial, *args, **kwargs):
        metrics = super()._evaluate(trial, *args, **kwargs)
        if self.state.global_step == 0 and self.args.load_best_model_at_end and metrics is not None \
                and self._determine_best_metric(metrics=metrics, trial=trial):
            self._save_checkpoint(self.model, trial)  # recorded as the best by _save_checkpoint below
        return metrics

    def _save_checkpoint(self, model, trial) -> None:
        if self.args.load_best_model_at_end and self.state.best_global_step == self.state.global_step:
            # The Trainer records the best checkpoint only where its folder exists when the rank looks (no barrier
            # under a CPU process group; never for step 0): a rank that looked too early would load another
            # checkpoint than the main process. The one written now is the best, on every rank; recorded before
            # the write, its trainer_state.json says so and the rotation of old checkpoints keeps it.
            self.state.best_model_checkpoint = str(Path(self._get_output_dir(trial=trial))
                                                   / f"checkpoint-{self.state.global_step}")
        # the DeepSpeed engine's module is self.model too (the PEFT model): one context covers every writer
        with only_trainable_in_state_dict(self.model):
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (adapter weights, config, tokenizer) without any part of the frozen base."""
        with only_trainable_in_state_dict(self.model):
            super().save_model(output_dir, _internal_call)
