"""A short model-level refinement of the initial adapter (RILQ, arXiv 2412.01129): only ``A`` and ``B`` train,
to make the compressed model's final hidden states match the uncompressed model's on the adapter
calibration text.

Layer-wise initializers (EoRA and the rest) each solve their own linear's objective; errors still
compound through the network. A few hundred AdamW steps against the teacher's last hidden states (the
decoder's output, before the LM head) recover part of that. The loss is the mean squared error divided
by the teacher's mean square, so its value reads as a relative error whatever the model's scale.

This runs while an init cache entry is built: on the main process alone, the other ranks waiting on a
file (no collective may run), so it is a plain loop over the same PEFT model and packed kernels the
Trainer fine-tunes through, not a second Trainer (whose DDP/DeepSpeed wrapping would wait for ranks
that are not there).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from eora_ft.placement import placed_for_inference


@torch.no_grad()
def teacher_hidden_states(model: nn.Module, calib_ids: torch.Tensor, batch_size: int,
                          device: torch.device | str) -> torch.Tensor:
    """The uncompressed model's last hidden states ``[samples, seq_len, hidden]`` fp32 on the CPU for
    ``calib_ids`` (int64 ``[samples, seq_len]``), computed on ``device`` (streamed there if it does not fit)."""
    outputs, device = [], torch.device(device)
    with placed_for_inference(model, device) as placed:
        decoder = placed.get_decoder()
        for start in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[start:start + batch_size].to(device)
            outputs.append(decoder(input_ids=ids).last_hidden_state.float().cpu())
    return torch.cat(outputs)


def refine_adapters(peft_model: nn.Module, calib_ids: torch.Tensor, teacher: torch.Tensor, steps: int,
                    learning_rate: float, batch_size: int, seed: int = 0) -> dict:
    """Train only the LoRA factors of ``peft_model`` (where it lives) for ``steps`` AdamW steps on random batches
    of ``calib_ids`` toward ``teacher`` (``[samples, seq_len, hidden]``, from :func:`teacher_hidden_states`).

    Returns ``{"steps", "loss_first", "loss_last", "losses" (every step), "seconds"}``; raises
    ``FloatingPointError`` on a non-finite loss (the learning rate is too high for this model)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("refine_adapters found no trainable parameter: the LoRA factors must require grad")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    decoder = peft_model.get_base_model().get_decoder()
    generator = torch.Generator().manual_seed(seed)
    scale = float(teacher.pow(2).mean())
    losses, start, was_training = [], time.perf_counter(), peft_model.training
    peft_model.train()
    for step in range(steps):
        rows = torch.randint(0, calib_ids.shape[0], (min(batch_size, calib_ids.shape[0]),), generator=generator)
        hidden = decoder(input_ids=calib_ids[rows].to(device)).last_hidden_state.float()
        loss = (hidden - teacher[rows].to(device)).pow(2).mean() / scale
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"refinement loss {losses[-1]} at step {step}: lower refine_learning_rate="
                                     f"{learning_rate}")
    peft_model.train(was_training)
    return {"steps": steps, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": losses, "seconds": time.perf_counter() - start}
