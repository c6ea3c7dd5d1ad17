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

Memory (Llama-3-8B, 8 x 2048 tokens a step; ``benchmarks/scale_bench.py --plan`` prints it for 8B and 70B):
without checkpointing every decoder layer keeps its activations for the backward pass (~3.3 GB a layer, ~105 GB
in all); with it (on by default: transformers' activation checkpointing, non-reentrant, restored afterwards) a
layer keeps only its input and the one being recomputed holds its own. On a CUDA device with bf16 the forward
runs under bf16 autocast (an fp32 model's saved activations halve; the loss and the teacher comparison stay
fp32); on a CPU nothing changes, so recorded fp32 values stay. The ``layers`` teacher can live in a memory-mapped file
(``teacher_hidden_states(file=...)``) instead of host memory. ``micro_batch_size`` splits each step's batch into
micro-batches whose gradients add up to the whole batch's (each loss weighted by its share of the rows); a step
that runs out of memory is retried with half the micro-batch (down to one row).

This runs while an init cache entry is built: on the main process alone, the other ranks waiting on a
file (no collective may run), so it is a plain loop over the same PEFT model and packed kernels the
Trainer fine-tunes through, not a second Trainer (whose DDP/DeepSpeed wrapping would wait for ranks
that are not there).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from eora_ft.utils.placement import placed_for_inference


REFINE_TARGETS = ("final", "layers")


def _targets(decoder: nn.Module, ids: torch.Tensor, target: str) -> tuple[torch.Tensor, ...]:
    """Hidden states ``[batch, seq, hidden]`` in the model's dtype: ``final``, the decoder's output alone;
    ``layers``, every layer's output (the embeddings left out, the last entry the final normed output)."""
    if target == "final":
        return (decoder(input_ids=ids, use_cache=False).last_hidden_state,)
    return decoder(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[1:]


def check_refine_target(target: str) -> None:
    if target not in REFINE_TARGETS:
        raise ValueError(f"refine_target={target!r} is unknown; valid: {list(REFINE_TARGETS)}")


def _teacher_buffer(shape: tuple[int, ...], dtype: torch.dtype, file: str | os.PathLike | None) -> torch.Tensor:
    """An empty host tensor, or one backed by ``file`` (memory-mapped, shared: the OS keeps only the pages in use)."""
    if file is None:
        return torch.empty(shape, dtype=dtype)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    Path(file).unlink(missing_ok=True)  # from_file maps what is there: never a stale teacher of another size
    return torch.from_file(os.fspath(file), shared=True, size=math.prod(shape), dtype=dtype).view(shape)


@torch.no_grad()
def teacher_hidden_states(model: nn.Module, calib_ids: torch.Tensor, batch_size: int,
                          device: torch.device | str, target: str = "final",
                          file: str | os.PathLike | None = None) -> torch.Tensor:
    """The uncompressed model's hidden states for ``calib_ids`` (int64 ``[samples, seq_len]``), on the CPU:
    ``final`` ``[samples, seq_len, hidden]`` fp32; ``layers`` ``[samples, num_layers, seq_len, hidden]`` in the
    model's dtype (fp32 would double it). Computed on ``device`` (streamed there if it does not fit).

    Written batch by batch into one preallocated tensor (no list of batches concatenated at the end: that held
    it twice, 2 x 69 GB for ``layers`` at 8B over 128 x 2048 tokens). ``file``: back it by this file instead of
    host memory (memory-mapped; refinement reads one batch of rows at a time), e.g. for ``layers`` at 8B."""
    check_refine_target(target)
    if calib_ids.ndim != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be a non-empty [samples, seq_len] tensor, got shape {tuple(calib_ids.shape)}")
    out, device = None, torch.device(device)
    with placed_for_inference(model, device) as placed:
        decoder = placed.get_decoder()
        for start in range(0, calib_ids.shape[0], batch_size):
            hidden = _targets(decoder, calib_ids[start:start + batch_size].to(device), target)
            stop = start + hidden[0].shape[0]
            if out is None:
                per_sample = hidden[0].shape[1:] if target == "final" else (len(hidden), *hidden[0].shape[1:])
                dtype = torch.float32 if target == "final" else hidden[0].dtype
                out = _teacher_buffer((calib_ids.shape[0], *per_sample), dtype, file)
            # one layer at a time to the host: no [batch, num_layers, seq, hidden] stack on the device
            for index, layer in enumerate(hidden):
                (out[start:stop] if target == "final" else out[start:stop, index]).copy_(layer)
            del hidden
    return out


def _toggle(model: nn.Module, name: str, **kwargs) -> None:
    """transformers >= 5.25 names it ``activation_checkpointing_*`` (``gradient_checkpointing_*`` is deprecated)."""
    current = getattr(model, f"activation_checkpointing_{name}", None)
    if current is not None:
        current(**({"activation_checkpointing_kwargs": kwargs} if kwargs else {}))
    else:
        older = getattr(model, f"gradient_checkpointing_{name}")
        older(**({"gradient_checkpointing_kwargs": kwargs} if kwargs else {}))


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, ``model`` (a transformers model) recomputes each decoder layer's activations in the
    backward pass (non-reentrant ``torch.utils.checkpoint``); afterwards it is as it was. Yields whether
    checkpointing is on (a model that does not support it, or one already checkpointing, is left alone)."""
    supported = bool(getattr(model, "supports_gradient_checkpointing", False))
    already = bool(getattr(model, "is_activation_checkpointing", None)
                   or getattr(model, "gradient_checkpointing", False)
                   or any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))
    if not enabled or not supported or already:
        yield already
        return
    had_input_hook = hasattr(model, "_require_grads_hook")
    _toggle(model, "enable", use_reentrant=False)
    try:
        yield True
    finally:
        _toggle(model, "disable")
        if not had_input_hook and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()  # the enable call made the embeddings' output require grad


def bf16_autocast_applies(device: torch.device) -> bool:
    """bf16 autocast is used on a CUDA device that has bf16 (Ampere and later: the H100); never on a CPU, so the
    fp32 CPU path computes exactly as before."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(rows.split(size)) if size < rows.numel() else [rows]


def refine_adapters(peft_model: nn.Module, calib_ids: torch.Tensor, teacher: torch.Tensor, steps: int,
                    learning_rate: float, batch_size: int, seed: int = 0, micro_batch_size: int | None = None,
                    gradient_checkpointing: bool = True, autocast: bool | None = None) -> dict:
    """Train only the LoRA factors of ``peft_model`` (where it lives) for ``steps`` AdamW steps on random batches
    of ``calib_ids`` toward ``teacher`` (from :func:`teacher_hidden_states`: ``[samples, seq_len, hidden]``
    for ``final``, ``[samples, num_layers, seq_len, hidden]`` for ``layers``; the target follows its shape).

    ``micro_batch_size``: rows per forward/backward (None: the whole batch; halved whenever a step runs out of
    memory); the step's gradient is the whole batch's either way. ``gradient_checkpointing``: recompute decoder
    layers in the backward pass (restored afterwards). ``autocast``: bf16 autocast of the forward (None: on CUDA
    with bf16, off on a CPU).

    Returns ``{"steps", "loss_first", "loss_last", "losses" (every step), "seconds", "micro_batch_size"}`` (the
    micro-batch the steps ended with); raises ``FloatingPointError`` on a non-finite loss (the learning rate is
    too high for this model)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("refine_adapters found no trainable parameter: the LoRA factors must require grad")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"refine micro_batch_size={micro_batch_size} must be >= 1 (or None: the whole batch)")
    device = params[0].device
    use_autocast = bf16_autocast_applies(device) if autocast is None else autocast
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    base = peft_model.get_base_model()
    decoder = base.get_decoder()
    generator = torch.Generator().manual_seed(seed)
    target = "layers" if teacher.dim() == 4 else "final"
    per_layer = (lambda batch: batch.unbind(1)) if target == "layers" else (lambda batch: (batch,))
    # mean squares one layer at a time: a float copy of a bf16 teacher would double its host memory
    scales = [float(layer.float().pow(2).mean()) for layer in per_layer(teacher)]
    rows_per_step = min(batch_size, calib_ids.shape[0])
    micro = min(micro_batch_size or rows_per_step, rows_per_step)

    def accumulate(rows: torch.Tensor) -> float:
        """Forward and backward over ``rows`` by micro-batches; the gradients add up to the batch mean's."""
        total = 0.0
        for part in _micro_batches(rows, micro):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                hidden_states = _targets(decoder, calib_ids[part].to(device), target)
            # layer by layer: no [batch, num_layers, seq, hidden] stack or fp32 copy of one on the device
            pairs = zip(hidden_states, per_layer(teacher[part]), scales)
            loss = sum(nn.functional.mse_loss(hidden.float(), wanted.to(device).float()) / scale
                       for hidden, wanted, scale in pairs) / len(scales)
            if part.numel() != rows.numel():  # a share of the batch mean (equal rows, equal elements per row)
                loss = loss * (part.numel() / rows.numel())
            loss.backward()
            total += float(loss.detach())
            del hidden_states, pairs, loss
        return total

    losses, start, was_training = [], time.perf_counter(), peft_model.training
    peft_model.train()
    with checkpointed_layers(base, gradient_checkpointing):
        for step in range(steps):
            rows = torch.randint(0, calib_ids.shape[0], (rows_per_step,), generator=generator)
            while True:
                try:
                    losses.append(accumulate(rows))
                    break
                except torch.OutOfMemoryError:
                    if micro == 1:
                        raise
                    optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    micro = max(1, micro // 2)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"refinement loss {losses[-1]} at step {step}: lower refine_learning_rate="
                                         f"{learning_rate}")
    peft_model.train(was_training)
    return {"steps": steps, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": losses, "seconds": time.perf_counter() - start, "micro_batch_size": micro}
