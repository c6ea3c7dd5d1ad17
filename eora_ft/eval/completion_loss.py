"""The held-out loss on the tokens fine-tuning trains: completions and assistant turns.

The metric fine-tuning moves first, and the one that separates initialisations where accuracy cannot (a
small model answers at chance). Computed on examples tokenized as they are trained
(:func:`eora_ft.data.sft.tokenize_sft`: ``input_ids`` and ``completion_mask``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from eora_ft.eval.scoring import _device, _eval_mode

# Tokens per forward pass: the logits of a batch are [tokens, vocab] in the model's dtype, 4 GB at a 128k
# vocabulary in bf16, beside the model on the GPU.
MAX_BATCH_TOKENS = 16384
CHUNK_ROWS = 2048


def completion_loss(model: torch.nn.Module, examples: Sequence[dict], batch_size: int = 32, pad_token_id: int = 0,
                    progress: bool = True, desc: str = "eval loss") -> dict:
    """Mean next-token cross-entropy over the loss tokens of ``examples`` (each ``{"input_ids": list[int],
    "completion_mask": list[int]}``), weighted by token: ``sum(nll) / n_tokens`` in fp64.

    Token ``t`` counts when ``completion_mask[t] == 1`` and ``t > 0`` (its logit comes from position ``t - 1``),
    as the Trainer's shifted labels count it. Batches hold at most ``batch_size`` examples and
    :data:`MAX_BATCH_TOKENS` padded tokens, longest first, right-padded with an attention mask; log-softmax
    runs in fp32 on the loss positions only, :data:`CHUNK_ROWS` at a time. Returns ``{"loss", "tokens",
    "examples"}`` (``loss`` is NaN with no token). The Trainer's ``eval_loss`` averages per-batch means instead,
    so it differs slightly."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    batches, current = [], []
    for index in order:
        width = len(examples[current[0]]["input_ids"]) if current else len(examples[index]["input_ids"])
        if current and (len(current) == batch_size or (len(current) + 1) * width > MAX_BATCH_TOKENS):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    device = _device(model)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with _eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress):
            rows = [examples[i] for i in batch]
            width = len(rows[0]["input_ids"])
            input_ids = torch.tensor([r["input_ids"] + [pad_token_id] * (width - len(r["input_ids"])) for r in rows],
                                     device=device)
            attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows],
                                     device=device)
            mask = torch.tensor([list(r["completion_mask"]) + [0] * (width - len(r["input_ids"])) for r in rows],
                                device=device, dtype=torch.bool)
            mask[:, 0] = False  # the first token has no prediction
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits  # [b, width, vocab]
            row_index, position = mask.nonzero(as_tuple=True)
            targets = input_ids[row_index, position]
            # fp32 log-softmax over CHUNK_ROWS loss positions at a time: [2048, 128k] fp32 is 1 GB, beside the
            # batch's logits, where all 16k rows at once would add 8 GB for the copy and 8 more inside the loss
            for start in range(0, int(row_index.numel()), CHUNK_ROWS):
                rows = slice(start, start + CHUNK_ROWS)
                selected = logits[row_index[rows], position[rows] - 1].float()  # [chunk, vocab]
                nll = torch.nn.functional.cross_entropy(selected, targets[rows], reduction="none")
                total += nll.double().sum().cpu()  # thousands of fp32 terms: the sum in fp64
            count += int(row_index.numel())
            del logits
    loss = float(total) / count if count else math.nan
    return {"loss": loss, "tokens": count, "examples": len(examples)}
