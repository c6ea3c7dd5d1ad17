"""Generation-based evaluation: GSM8K exact match, lm-evaluation-harness 0.4.x semantics.

Greedy decoding of each few-shot context until a stop string (``Question:``, ``</s>``,
``<|im_end|>``) or ``max_new_tokens``; the context is cut from the left so that context plus
generation fit the model's window (lm-eval's ``HFLM`` does the same). Two extractions are scored:
``strict`` (the number after ``#### ``) and ``flexible`` (the last number in the text).
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from eora_ft.data.gsm8k import (
    STOP_STRINGS,
    MathWordProblem,
    extract_flexible,
    extract_strict,
    fewshot_contexts,
    normalise,
)
from eora_ft.eval.scoring import _device, _encode, _eval_mode, _max_length


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def generate_until(model: torch.nn.Module, tokenizer, contexts: Sequence[str], max_new_tokens: int = 256,
                   batch_size: int = 8, stops: Sequence[str] = STOP_STRINGS, progress: bool = True,
                   desc: str = "generate") -> list[str]:
    """Greedy continuations of ``contexts`` (left-padded batches), each cut at its first stop string."""
    device = _device(model)
    budget = _max_length(model, tokenizer) - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a context in the model's "
                         f"{_max_length(model, tokenizer)}-token window")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_encode(tokenizer, c)[-budget:] for c in contexts]
    # Longest first: batches of similar length waste less padding; results go back in input order.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with _eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            batch = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long, device="cpu")  # built on the host, moved once
            mask = torch.zeros((len(batch), width), dtype=torch.long, device="cpu")
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], device="cpu")
                mask[row, width - len(encoded[i]):] = 1
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, stop_strings=list(stops), tokenizer=tokenizer,
            )[:, width:]
            for row, i in enumerate(batch):
                outputs[i] = _cut_at_stop(tokenizer.decode(generated[row], skip_special_tokens=True), stops)
    return outputs


def score_gsm8k(model: torch.nn.Module, tokenizer, items: Sequence[MathWordProblem],
                fewshot_pool: Sequence[MathWordProblem], num_fewshot: int = 5, max_new_tokens: int = 256,
                batch_size: int = 8, progress: bool = True) -> dict:
    """``{"strict", "flexible", "n"}``: exact-match rates of the two extractions over ``items``."""
    if not items:
        raise ValueError("score_gsm8k needs at least one item, got 0")
    contexts = fewshot_contexts(items, fewshot_pool, num_fewshot)
    generations = generate_until(model, tokenizer, contexts, max_new_tokens, batch_size, progress=progress,
                                 desc="gsm8k")
    strict = flexible = 0
    for item, text in zip(items, generations):
        gold = normalise(item.answer)
        strict += int(normalise(extract_strict(text)) == gold)
        flexible += int(normalise(extract_flexible(text)) == gold)
    return {"strict": strict / len(items), "flexible": flexible / len(items), "n": len(items)}
