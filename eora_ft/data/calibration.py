"""GPTQ-style calibration batches: random fixed-length token windows from a text corpus."""

from __future__ import annotations

import os
import random

import torch

from eora_ft.data.sources import is_text_file, load_records, read_text, resolve_path


def _documents(text_path_or_id: str) -> list[str]:
    resolved = resolve_path(text_path_or_id)
    if is_text_file(resolved):
        # A plain-text corpus (e.g. WikiText-2 joined with "\n\n"): its paragraphs are the documents.
        return [p for p in read_text(resolved).split("\n\n") if p.strip()]
    records = load_records(resolved)
    if "text" not in records.column_names:
        raise ValueError(f"{text_path_or_id!r} has no 'text' field (columns: {records.column_names})")
    return [t for t in records["text"] if t and t.strip()]


def calibration_tokens(
    tokenizer, text_path_or_id: str, num_samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """Sample `num_samples` windows of `seq_len` tokens, GPTQ style.

    Each document (a jsonl record's `text`, or a .txt paragraph) is tokenized without special
    tokens. Each sample picks a random document with at least `seq_len + 1` tokens, then a random
    window inside it (same ranges as GPTQ's `get_c4`). When fewer than `num_samples` documents are
    that long, sampling with replacement from so few would repeat text, so windows are drawn from
    all documents concatenated with the EOS token between them instead.

    Returns an int64 tensor of shape `[num_samples, seq_len]` (CPU). Deterministic in `seed`.
    Raises ValueError for num_samples < 1, seq_len < 2, or a corpus shorter than `seq_len` tokens.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got num_samples={num_samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one input and one target token), got seq_len={seq_len}")
    docs = _documents(text_path_or_id)
    # verbose=False: long documents are expected here; the "longer than model_max_length" warning is noise.
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"] if docs else []
    rng = random.Random(seed)

    long_docs = [ids for ids in encoded if len(ids) >= seq_len + 1]
    if len(long_docs) < num_samples:
        return _stream_windows(tokenizer, encoded, num_samples, seq_len, rng, text_path_or_id)
    rows: list[list[int]] = []
    for _ in range(num_samples):
        ids = rng.choice(long_docs)
        start = rng.randint(0, len(ids) - seq_len - 1)
        rows.append(ids[start : start + seq_len])
    return torch.tensor(rows, dtype=torch.long)


def _stream_windows(tokenizer, encoded: list[list[int]], num_samples: int, seq_len: int, rng: random.Random,
                    source: str) -> torch.LongTensor:
    # all documents joined by EOS, windows drawn anywhere in the stream
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for i, ids in enumerate(encoded):
        stream.extend(sep + ids if i else ids)
    if len(stream) < seq_len:
        raise ValueError(
            f"calibration set of {len(stream)} tokens is shorter than seq_len={seq_len} "
            f"(source {os.fspath(source)!r}); use a smaller seq_len or more text"
        )
    rows = []
    for _ in range(num_samples):
        start = rng.randint(0, len(stream) - seq_len)
        rows.append(stream[start : start + seq_len])
    return torch.tensor(rows, dtype=torch.long)


def text_calibration_tokens(tokenizer, texts: list[str], num_samples: int, seq_len: int, seed: int = 0,
                            source: str = "task data") -> torch.LongTensor:
    """Windows ``[num_samples, seq_len]`` (int64) from short texts (e.g. formatted task examples) joined by EOS.

    Task examples are far shorter than a calibration window, so they are concatenated first (the
    EoRA paper's calibration is about half task data, half C4)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got num_samples={num_samples}")
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return _stream_windows(tokenizer, encoded, num_samples, seq_len, random.Random(seed), source)


def describe_calibration(tokens: torch.Tensor) -> dict:
    """Summary of a `[num_samples, seq_len]` calibration tensor, for logs and run metadata."""
    num_samples, seq_len = tokens.shape
    return {"num_samples": int(num_samples), "seq_len": int(seq_len), "tokens": int(tokens.numel())}


def mixed_calibration(tokenizer, corpus: str, task_texts: list[str], num_samples: int, seq_len: int,
                      task_fraction: float = 0.0, seed: int = 0) -> torch.LongTensor:
    """``[num_samples, seq_len]`` int64: ``round(task_fraction * num_samples)`` windows of task text, the
    rest from ``corpus`` (C4 and/or WikiText: several sources separated by commas share the corpus rows
    evenly), corpus rows first."""
    if not 0.0 <= task_fraction <= 1.0:
        raise ValueError(f"calib_task_fraction={task_fraction} must lie in [0, 1]")
    n_task = round(task_fraction * num_samples)
    parts = []
    sources = [source.strip() for source in corpus.split(",") if source.strip()]
    n_corpus = num_samples - n_task
    for index, source in enumerate(sources):
        share = n_corpus // len(sources) + (1 if index < n_corpus % len(sources) else 0)
        if share:
            parts.append(calibration_tokens(tokenizer, resolve_path(source), share, seq_len, seed=seed))
    if n_task:
        parts.append(text_calibration_tokens(tokenizer, task_texts, n_task, seq_len, seed=seed))
    return torch.cat(parts)
