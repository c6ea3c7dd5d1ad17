"""MathQA parsing follows lm-evaluation-harness's `mathqa` task exactly."""

import json
import re

import pytest

from eora_ft.data.mathqa import load_mathqa, parse_mathqa_record, parse_options


def _lm_eval_doc_to_choice(options: str) -> list[str]:
    # lm-eval 0.4.13 lm_eval/tasks/mathqa/utils.py, verbatim logic (the reference we must equal)
    return [c[4:].rstrip(" ,") for c in re.findall(r"[abcd] \) .*?, |e \) .*?$", options)]


@pytest.mark.parametrize("options,expected", [
    ("a ) 24 , b ) 120 , c ) 625 , d ) 720 , e ) 1024", ["24", "120", "625", "720", "1024"]),
    ("a ) rs . 1,200 , b ) rs . 1,500 , c ) 2 / 3 , d ) none , e ) 5 % of it", ["rs . 1,200", "rs . 1,500", "2 / 3", "none", "5 % of it"]),
])
def test_parse_options(options, expected):
    assert parse_options(options) == expected == _lm_eval_doc_to_choice(options)


def test_bundled_files_parse_like_lm_eval(assets_dir):
    for name in ("dev_head1000.json", "test_head500.json"):
        path = assets_dir / "data" / "mathqa" / name
        records = json.loads(path.read_text())
        items = load_mathqa(str(path))
        assert len(items) == len(records) == (1000 if name.startswith("dev") else 500)
        for record, item in zip(records, items):
            assert item.choices == _lm_eval_doc_to_choice(record["options"])
            assert item.gold == "abcde".index(record["correct"]) and item.question == record["Problem"]


def test_bad_records_name_the_problem():
    with pytest.raises(ValueError, match="correct='f'"):
        parse_mathqa_record({"Problem": "p", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "f"}, 3)
    with pytest.raises(ValueError, match="no field 'options'"):
        parse_mathqa_record({"Problem": "p", "correct": "a"})
