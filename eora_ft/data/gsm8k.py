"""GSM8K loading and formatting, in lm-evaluation-harness's `gsm8k` shape (5-shot, generate until).

Training sees the zero-shot query ``Question: {question}\\nAnswer:`` and, as the completion, the full
reference solution ending in ``#### n``; evaluation prepends 5 solved training examples separated by
blank lines, the way lm-eval builds its few-shot context.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import datasets

from eora_ft.data.sources import load_records

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")
# lm-eval gsm8k.yaml filters and exact_match normalisation.
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]
INVALID = "[invalid]"


@dataclass
class MathWordProblem:
    """One GSM8K problem: ``answer`` is the reference solution text ending in ``#### n``."""

    id: str
    question: str
    answer: str


def load_gsm8k(path_or_id: str, split: str = "test", name: str | None = "main",
               limit: int | None = None) -> list[MathWordProblem]:
    """GSM8K problems from a local .jsonl (``question``/``answer``) or the hub (``openai/gsm8k``, config ``main``)."""
    records = load_records(path_or_id, split=split, name=name)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    items = []
    for i, record in enumerate(records):
        if "question" not in record or "answer" not in record:
            raise ValueError(f"GSM8K record {i} of {path_or_id!r} needs 'question' and 'answer'; has {sorted(record)}")
        if "####" not in record["answer"]:
            raise ValueError(f"GSM8K record {i} of {path_or_id!r}: the answer does not end in '#### n'")
        items.append(MathWordProblem(id=f"gsm8k-{i}", question=record["question"], answer=record["answer"]))
    return items


def gsm8k_prompt(item: MathWordProblem) -> str:
    """The zero-shot query (no trailing space)."""
    return PROMPT_TEMPLATE.format(question=item.question)


def gsm8k_sft_dataset(items: Iterable[MathWordProblem]) -> datasets.Dataset:
    """TRL prompt-completion dataset: the query, then ``" " + full solution`` (loss on the solution only)."""
    items = list(items)
    return datasets.Dataset.from_dict({"prompt": [gsm8k_prompt(it) for it in items],
                                       "completion": [" " + it.answer for it in items]})


def fewshot_contexts(items: Sequence[MathWordProblem], pool: Sequence[MathWordProblem], num_fewshot: int = 5,
                     seed: int = FEWSHOT_SEED) -> list[str]:
    """One context per item: ``num_fewshot`` solved problems drawn from ``pool``, then the item's query.

    As lm-eval's default sampler: one ``random.Random(seed)`` drawn from in item order, a fresh sample
    per item; when the item itself is in the pool, one spare is drawn and the item dropped.
    """
    if num_fewshot and len(pool) < num_fewshot + 1:
        raise ValueError(f"num_fewshot={num_fewshot} needs at least {num_fewshot + 1} examples in the few-shot pool, "
                         f"got {len(pool)}")
    rng = random.Random(seed)
    pool = list(pool)
    in_pool = {s.question for s in pool}
    contexts = []
    for item in items:
        if not num_fewshot:
            shots = []
        elif item.question in in_pool:  # evaluating on the few-shot split: draw one spare, drop the item
            shots = [s for s in rng.sample(pool, num_fewshot + 1) if s.question != item.question][:num_fewshot]
        else:
            shots = rng.sample(pool, num_fewshot)
        parts = [f"{gsm8k_prompt(s)} {s.answer}" for s in shots] + [gsm8k_prompt(item)]
        contexts.append(FEWSHOT_DELIMITER.join(parts))
    return contexts


def normalise(text: str) -> str:
    """lm-eval's exact_match normalisation for gsm8k: drop ``,``, ``$``, everything up to ``#### ``, a final ``.``."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def extract_strict(generation: str) -> str:
    """The number after the first ``#### `` (lm-eval ``strict-match``), or ``[invalid]``."""
    match = STRICT.search(generation)
    return match.group(1) if match else INVALID


def extract_flexible(generation: str) -> str:
    """The last number-like span of the generation (lm-eval ``flexible-extract``), or ``[invalid]``."""
    matches = FLEXIBLE.findall(generation)
    if not matches:
        return INVALID
    return next(group for group in matches[-1] if group)
