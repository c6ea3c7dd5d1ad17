"""Task examples formatted as calibration text, for each supported schema."""

import json

import pytest

from eora_ft.data.task_text import task_texts


def test_arc_text_is_prompt_plus_gold(assets_dir):
    texts = task_texts("arc", str(assets_dir / "data/arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"), limit=3)
    assert len(texts) == 3 and all(t.startswith("Question: ") and "\nAnswer: " in t for t in texts)


def test_gsm8k_and_mathqa_schemas(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n")
    assert task_texts("gsm8k", str(gsm)) == ["Question: 2+2?\nAnswer: 2+2=4\n#### 4"]
    mathqa = tmp_path / "mathqa.json"
    mathqa.write_text(json.dumps([{"Problem": "5 ^ 2 ?", "Rationale": "\"5 * 5 = 25 . answer : b\"",
                                   "options": "a ) 10 , b ) 25", "correct": "b"}]))
    assert task_texts("mathqa", str(mathqa)) == ["Question: 5 ^ 2 ?\nOptions: a ) 10 , b ) 25\nAnswer: 5 * 5 = 25 . answer : b"]


def test_wrong_schema_and_unknown_format(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(ValueError, match="not in the mathqa schema: missing field 'Problem'"):
        task_texts("mathqa", str(gsm))
    with pytest.raises(ValueError, match="calib_task_format='squad' is unknown"):
        task_texts("squad", str(gsm))
