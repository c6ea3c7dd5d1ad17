"""Task examples as plain text, for the task share of a calibration mix (not for training or scoring).

Each format turns one record of the task's usual schema into ``Question: ...\\nAnswer: ...`` text,
the shape the evaluation prompts use, so calibration sees the task's vocabulary and layout.
"""

from __future__ import annotations

from typing import Callable

from eora_ft.data.arc import _parse_record, arc_prompt
from eora_ft.data.sources import load_records


def _arc(record: dict) -> str:
    item = _parse_record(record)
    return f"{arc_prompt(item)} {item.choices[item.gold]}"


def _gsm8k(record: dict) -> str:
    return f"Question: {record['question']}\nAnswer: {record['answer']}"


def _mathqa(record: dict) -> str:
    return f"Question: {record['Problem']}\nOptions: {record['options']}\nAnswer: {record['Rationale'].strip(chr(34))}"


TASK_TEXT_FORMATS: dict[str, Callable[[dict], str]] = {"arc": _arc, "gsm8k": _gsm8k, "mathqa": _mathqa}


def task_texts(task_format: str, path_or_id: str, split: str = "train", name: str | None = None,
               limit: int | None = None) -> list[str]:
    """Formatted examples of ``path_or_id`` (local .json/.jsonl or hub id) in ``task_format``."""
    if task_format not in TASK_TEXT_FORMATS:
        raise ValueError(f"calib_task_format={task_format!r} is unknown; valid: {sorted(TASK_TEXT_FORMATS)}")
    records = load_records(path_or_id, split=split, name=name)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    try:
        return [TASK_TEXT_FORMATS[task_format](record) for record in records]
    except KeyError as err:
        raise ValueError(f"{path_or_id!r} is not in the {task_format} schema: missing field {err}") from err
