"""A short model-level refinement of the initial adapter (RILQ, arXiv 2412.01129): only ``A`` and ``B`` train,
to make the compressed model's hidden states match the uncompressed model's on the adapter calibration text.

Layer-wise initializers (EoRA and the rest) each solve their own linear's objective; errors still
compound through the network. A few hundred AdamW steps against the teacher recover part of that. Two
targets (``refine_target``): ``final``, the decoder's output before the LM head (RILQ's model-level
loss), and ``layers``, every decoder layer's output (the last one is ``final``), each layer's error
weighted alike. The loss is the mean squared error divided by the teacher's mean square (per layer for
``layers``), so it reads as a relative error whatever the model's scale. ``layers`` keeps every layer's
teacher: ``num_layers`` times the memory of ``final`` (Llama-3-8B, 64 windows of 512 tokens: 8.6 GB in
bf16 against 0.54 GB in fp32), held on the CPU and moved a batch at a time.

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

from eora_ft.utils.placement import placed_for_inference


REFINE_TARGETS = ("final", "layers")


def _targets(decoder: nn.Module, ids: torch.Tensor, target: str) -> tuple[torch.Tensor, ...]:
    """Hidden states ``[batch, seq, hidden]`` in the model's dtype: ``final``, the decoder's output alone;
    ``layers``, every layer's output (the embeddings left out, the last entry the final normed output)."""
    if target == "final":
        return (decoder(input_ids=ids).last_hidden_state,)
    return decoder(input_ids=ids, output_hidden_states=True).hidden_states[1:]


def check_refine_target(target: str) -> None:
    if target not in REFINE_TARGETS:
        raise ValueError(f"refine_target={target!r} is unknown; valid: {list(REFINE_TARGETS)}")


@torch.no_grad()
def teacher_hidden_states(model: nn.Module, calib_ids: torch.Tensor, batch_size: int,
                          device: torch.device | str, target: str = "final") -> torch.Tensor:
    """The uncompressed model's hidden states for ``calib_ids`` (int64 ``[samples, seq_len]``), on the CPU:
    ``final`` ``[samples, seq_len, hidden]`` fp32; ``layers`` ``[samples, num_layers, seq_len, hidden]`` in the
    model's dtype (fp32 would double an 8B model's 8.6 GB). Computed on ``device`` (streamed there if it does
    not fit)."""
    check_refine_target(target)
    outputs, device = [], torch.device(device)
    with placed_for_inference(model, device) as placed:
        decoder = placed.get_decoder()
        for start in range(0, calib_ids.shape[0], batch_size):
            hidden = _targets(decoder, calib_ids[start:start + batch_size].to(device), target)
            outputs.append(hidden[0].float().cpu() if target == "final" else torch.stack([h.cpu() for h in hidden], 1))
    return torch.cat(outputs)


def refine_adapters(peft_model: nn.Module, calib_ids: torch.Tensor, teacher: torch.Tensor, steps: int,
                    learning_rate: float, batch_size: int, seed: int = 0) -> dict:
    """Train only the LoRA factors of ``peft_model`` (where it lives) for ``steps`` AdamW steps on random batches
    of ``calib_ids`` toward ``teacher`` (from :func:`teacher_hidden_states`: ``[samples, seq_len, hidden]``
    for ``final``, ``[samples, num_layers, seq_len, hidden]`` for ``layers``; the target follows its shape).

    Returns ``{"steps", "loss_first", "loss_last", "losses" (every step), "seconds"}``; raises
    ``FloatingPointError`` on a non-finite loss (the learning rate is too high for this model)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("refine_adapters found no trainable parameter: the LoRA factors must require grad")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    decoder = peft_model.get_base_model().get_decoder()
    generator = torch.Generator().manual_seed(seed)
    target = "layers" if teacher.dim() == 4 else "final"
    per_layer = (lambda batch: batch.unbind(1)) if target == "layers" else (lambda batch: (batch,))
    # mean squares one layer at a time: a float copy of a bf16 teacher would double its host memory
    scales = [float(layer.float().pow(2).mean()) for layer in per_layer(teacher)]
    losses, start, was_training = [], time.perf_counter(), peft_model.training
    peft_model.train()
    for step in range(steps):
        rows = torch.randint(0, calib_ids.shape[0], (min(batch_size, calib_ids.shape[0]),), generator=generator)
        # layer by layer: no [batch, num_layers, seq, hidden] stack or fp32 copy of one on the device
        pairs = zip(_targets(decoder, calib_ids[rows].to(device), target), per_layer(teacher[rows]), scales)
        loss = sum(nn.functional.mse_loss(hidden.float(), wanted.to(device).float()) / scale
                   for hidden, wanted, scale in pairs) / len(scales)
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
