"""MathQA loading and SFT formatting, in lm-evaluation-harness's `mathqa` shape.

A record holds ``Problem``, ``options`` (one string: ``"a ) 24 , b ) 120 , c ) 625 , d ) 720 , e ) 1024"``)
and ``correct`` (a letter). The prompt is ``Question: {Problem}\\nAnswer:`` and the choices are the
option texts without their letters, cut exactly as lm-eval's ``utils.doc_to_choice`` cuts them.
"""

from __future__ import annotations

import re
from typing import Any

from eora_ft.data.arc import MultipleChoiceItem
from eora_ft.data.sources import load_records

LETTERS = ("a", "b", "c", "d", "e")
# lm-eval 0.4.x tasks/mathqa/utils.py: options a-d end with " , ", e runs to the end of the string.
_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


def parse_options(options: str) -> list[str]:
    """``"a ) 24 , b ) 120 , ..."`` -> ``["24", "120", ...]`` (lm-eval's cut: drop ``"x ) "``, strip " ,")."""
    return [match[4:].rstrip(" ,") for match in _OPTION.findall(options)]


def parse_mathqa_record(record: dict[str, Any], index: int = 0) -> MultipleChoiceItem:
    """One MathQA record as a :class:`MultipleChoiceItem`; raises naming the record when malformed."""
    try:
        problem, options, correct = record["Problem"], record["options"], str(record["correct"]).strip()
    except KeyError as err:
        raise ValueError(f"MathQA record {index} has no field {err}; expected Problem, options, correct") from err
    choices = parse_options(options)
    if correct not in LETTERS or LETTERS.index(correct) >= len(choices):
        raise ValueError(f"MathQA record {index}: correct={correct!r} does not name one of its {len(choices)} "
                         f"options {options!r}")
    return MultipleChoiceItem(id=f"mathqa-{index}", question=problem, choices=choices, gold=LETTERS.index(correct))


def load_mathqa(path_or_id: str, split: str = "test", name: str | None = None,
                limit: int | None = None) -> list[MultipleChoiceItem]:
    """MathQA items from a local .json/.jsonl file (the official release) or a hub id (``allenai/math_qa``)."""
    records = load_records(path_or_id, split=split, name=name)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    return [parse_mathqa_record(record, i) for i, record in enumerate(records)]
