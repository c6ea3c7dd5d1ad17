"""ARC (AI2 Reasoning Challenge) loading, prompting and SFT formatting.

The prompt is lm-evaluation-harness's `arc_challenge` one, so fine-tuning and evaluation see the
same text: `Question: {question}\\nAnswer:` followed by `" " + choice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import datasets

from eora_ft.data.sources import load_records

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class MultipleChoiceItem:
    """One multiple-choice question; `gold` indexes `choices`."""

    id: str
    question: str
    choices: list[str]
    gold: int


def _parse_record(record: dict[str, Any]) -> MultipleChoiceItem:
    item_id = str(record.get("id", "<no id>"))
    question = record["question"]
    if isinstance(question, dict):
        # AI2 raw release: question is {"stem", "choices": [{"text", "label"}, ...]}.
        stem = question["stem"]
        texts = [c["text"] for c in question["choices"]]
        labels = [str(c["label"]) for c in question["choices"]]
    else:
        # Hugging Face allenai/ai2_arc: question is a string, choices are parallel lists.
        stem = question
        texts = list(record["choices"]["text"])
        labels = [str(label) for label in record["choices"]["label"]]
    answer = str(record["answerKey"]).strip()
    if answer not in labels:
        raise ValueError(
            f"ARC record {item_id!r}: answerKey {answer!r} is not among its choice labels {labels}"
        )
    # Labels are letters A-E or digits 1-4 depending on the source exam; only their order matters.
    return MultipleChoiceItem(id=item_id, question=stem, choices=texts, gold=labels.index(answer))


def load_arc(
    path_or_id: str, split: str = "train", name: str | None = None, limit: int | None = None
) -> list[MultipleChoiceItem]:
    """Load ARC items from an AI2 raw .jsonl file or the HF `allenai/ai2_arc` dataset.

    `split`/`name` only matter for hub ids (e.g. `name="ARC-Challenge"`, `split="validation"`).
    `limit` keeps the first `limit` items, in file order.
    """
    records = load_records(path_or_id, split=split, name=name)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    return [_parse_record(r) for r in records]


def arc_prompt(item: MultipleChoiceItem) -> str:
    """The zero-shot lm-eval `arc_challenge` context for `item` (no trailing space)."""
    return PROMPT_TEMPLATE.format(question=item.question)


def arc_sft_dataset(items: Iterable[MultipleChoiceItem]) -> datasets.Dataset:
    """TRL prompt-completion dataset: `prompt` = arc_prompt(item), `completion` = " " + gold choice.

    TRL's SFTTrainer computes the loss on the completion tokens only for this format.
    """
    items = list(items)
    return datasets.Dataset.from_dict(
        {
            "prompt": [arc_prompt(it) for it in items],
            "completion": [" " + it.choices[it.gold] for it in items],
        }
    )
