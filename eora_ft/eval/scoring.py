"""Zero-shot evaluation: multiple-choice accuracy (lm-evaluation-harness 0.4.x semantics) and
GPTQ-style WikiText-2 perplexity, both runnable in-process on a model being trained."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eora_ft.data.arc import MultipleChoiceItem, arc_prompt


@contextmanager
def _eval_mode(model: torch.nn.Module):
    # Evaluation may run between training steps: leave the model in the mode we found it in.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    """Where to put the inputs: the model's device, or the CPU for a model whose weights stream in through
    accelerate's offload hooks (its parameters then sit on the meta device and the hooks move the inputs)."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _max_length(model: torch.nn.Module, tokenizer) -> int:
    # Same lookup order as lm-eval's HFLM.max_length.
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    return int(model_max) if model_max and model_max < 10**9 else 2048


def _encode(tokenizer, text: str) -> list[int]:
    # No BOS: lm-eval's HFLM encodes with add_special_tokens=False for causal LMs by default.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def encode_prefix(tokenizer, text: str, n_tokens: int | None) -> list[int]:
    """The first ``n_tokens`` token ids of ``text`` (all of them for None), tokenizing only a prefix.

    The prefix ends at a line break well past the tokens needed (about 8 characters per token, doubled
    until it yields 64 tokens more than needed), so the tokens kept are those of the whole text: BPE
    never merges across a line break. Held-out texts are megabytes; a perplexity run reads 20k tokens."""
    if n_tokens is None:
        return _encode(tokenizer, text)
    chars = 8 * n_tokens
    while chars < len(text):
        cut = text.rfind("\n", 0, chars)
        if cut > 0:
            ids = _encode(tokenizer, text[:cut])
            if len(ids) >= n_tokens + 64:
                return ids[:n_tokens]
        chars *= 2
    return _encode(tokenizer, text)[:n_tokens]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval's `_encode_pair` builds them.

    Trailing whitespace of the context moves onto the continuation, the pair is tokenized jointly
    and the continuation is what follows the context's own tokens, so BPE merges across the
    boundary match how the model saw such text. An empty context becomes the EOS token.
    """
    if context == "":
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[float]:
    """Sum of log p(continuation tokens | preceding tokens) for each (context, continuation).

    Model input is `(ctx + cont)[:-1]` left-truncated to `max_length` tokens (default: the model's
    position limit); requests are batched longest-first, right-padded with an attention mask.
    Log-softmax runs in fp32 on the continuation positions only (`[continuation tokens in the
    batch, vocab]`), sums in fp64.
    Returns python floats in request order.
    """
    max_length = max_length or _max_length(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        encoded.append(((ctx + cont)[-(max_length + 1) :][:-1], cont))
    # Longest first: similar lengths share a batch (less padding) and OOM would show at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results = [0.0] * len(encoded)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with _eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress):
            width = len(encoded[batch[0]][0])
            inputs = [encoded[idx][0] for idx in batch]
            input_ids = torch.tensor([inp + [pad_id] * (width - len(inp)) for inp in inputs], device=device)
            attention_mask = torch.tensor([[1] * len(inp) + [0] * (width - len(inp)) for inp in inputs], device=device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [b, width, vocab]
            # Logit at position p predicts token p+1, so a continuation's logits end at its row's
            # last real input position. One gather for the whole batch keeps the op count (and
            # thread synchronisation on small CPUs) independent of the number of requests.
            rows, positions, targets = [], [], []
            for row, idx in enumerate(batch):
                inp, cont = encoded[idx]
                rows += [row] * len(cont)
                positions += range(len(inp) - len(cont), len(inp))
                targets += cont
            rows_t = torch.tensor(rows, device=logits.device)
            selected = logits[rows_t, torch.tensor(positions, device=logits.device)].float()  # [n_cont, vocab]
            token_lp = selected.log_softmax(-1).gather(-1, torch.tensor(targets, device=logits.device)[:, None])
            sums = torch.zeros(len(batch), dtype=torch.float64, device=logits.device)
            sums.index_add_(0, rows_t, token_lp.squeeze(-1).double())
            for idx, value in zip(batch, sums.tolist()):
                results[idx] = value
    return results


def score_multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[MultipleChoiceItem],
    prompt_fn: Callable[[MultipleChoiceItem], str] = arc_prompt,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "arc",
) -> dict:
    """Zero-shot multiple-choice accuracy, as lm-eval's `multiple_choice` output type.

    Each choice is scored by the summed log-likelihood of `" " + choice` after `prompt_fn(item)`.
    `acc`: argmax of the sums hits `gold`; `acc_norm`: argmax of sum / len(choice) in characters
    (lm-eval divides by the length of the raw choice text from `doc_to_choice`, without the
    target delimiter). Ties go to the first choice (numpy argmax).
    Returns `{"acc": float, "acc_norm": float, "n": int}`.
    """
    if not items:
        raise ValueError("score_multiple_choice needs at least one item, got 0")
    requests = [(prompt_fn(item), " " + choice) for item in items for choice in item.choices]
    lls = loglikelihoods(model, tokenizer, requests, batch_size, max_length, progress, desc)
    hits = hits_norm = 0
    offset = 0
    for item in items:
        item_lls = np.array(lls[offset : offset + len(item.choices)])
        offset += len(item.choices)
        lengths = np.array([float(len(choice)) for choice in item.choices])
        hits += int(np.argmax(item_lls) == item.gold)
        hits_norm += int(np.argmax(item_lls / lengths) == item.gold)
    n = len(items)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n}


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "wikitext2",
) -> dict:
    """GPTQ-style perplexity over non-overlapping windows of `window` tokens.

    The whole text is tokenized once (no special tokens) and cut into `numel // window` windows
    (the first `max_windows` if set); each window is scored independently (no carried context).
    ppl = exp(mean next-token cross-entropy over all windows), accumulated in fp64.
    Returns `{"ppl": float, "windows": int, "tokens": int}` (`tokens`: the tokens scored, i.e.
    windows * window).
    """
    needed = None if max_windows is None else max_windows * window
    ids = torch.tensor(encode_prefix(tokenizer, text, needed), dtype=torch.long, device="cpu")  # host side; batches move
    n_windows = ids.numel() // window
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of window={window}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * window].view(n_windows, window)  # [n_windows, window]
    device = _device(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device="cpu")
    with _eval_mode(model):
        for start in tqdm(range(0, n_windows, batch_size), desc=desc, disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # [b, window, vocab]
            # One window at a time: its fp32 logits and log-softmax are [window, vocab] (512 x 128k: 0.5 GB
            # together), not the whole batch's (8x that, beside the model on the GPU).
            batch_nll = torch.zeros((), dtype=torch.float64, device=logits.device)
            for row, ids_row in zip(logits, batch):
                token_nll = F.cross_entropy(row[:-1].float(), ids_row[1:], reduction="none")  # [window - 1] fp32
                # Summing thousands of fp32 terms drifts by ~1e-6 relative; fp64 keeps the total exact.
                batch_nll += token_nll.double().sum()
            nll_sum += batch_nll.cpu()  # one device-to-host copy per batch
            del logits
    mean_nll = float(nll_sum) / (n_windows * (window - 1))
    return {"ppl": math.exp(mean_nll), "windows": n_windows, "tokens": n_windows * window}


def evaluate_stage(
    model: torch.nn.Module,
    tokenizer,
    arc_items: Sequence[MultipleChoiceItem] | None,
    wikitext_text: str | None,
    *,
    ppl_window: int = 512,
    ppl_max_windows: int | None = None,
    batch_size: int = 32,
    ppl_batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """ARC-Challenge and WikiText-2 metrics as flat, logger-friendly keys.

    Returns any of `arc_challenge/acc`, `arc_challenge/acc_norm`, `arc_challenge/n`,
    `wikitext2/ppl`; a metric whose input is None is skipped.
    """
    metrics: dict = {}
    if arc_items is not None:
        arc = score_multiple_choice(model, tokenizer, arc_items, batch_size=batch_size, progress=progress)
        metrics.update({f"arc_challenge/{k}": v for k, v in arc.items()})
    if wikitext_text is not None:
        ppl = perplexity(
            model, tokenizer, wikitext_text, window=ppl_window, max_windows=ppl_max_windows,
            batch_size=ppl_batch_size, progress=progress,
        )
        metrics["wikitext2/ppl"] = ppl["ppl"]
    return metrics
