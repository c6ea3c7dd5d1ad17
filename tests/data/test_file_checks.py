"""check_data_file: every bundled data file passes; a broken one is named with its line and the fix."""

import json
from pathlib import Path

import pytest

from eora_ft.data.file_checks import DataFileError, check_data_file

DATA = Path(__file__).resolve().parents[2] / "eora_ft" / "assets" / "data"
SCHEMAS = {"arc": "arc", "gsm8k": "gsm8k", "mathqa": "mathqa", "sft": None}  # sft: any TRL layout


@pytest.mark.parametrize("path", sorted(p for p in DATA.rglob("*") if p.suffix in (".json", ".jsonl", ".txt")
                                        and p.name not in ("SHA256SUMS.txt",)),
                         ids=lambda p: str(p.relative_to(DATA)))
def test_every_bundled_data_file_passes(path):
    top = path.relative_to(DATA).parts[0]
    schema = SCHEMAS[top] if top in SCHEMAS else ("text" if path.suffix != ".txt" else None)
    assert check_data_file(path, "bundled", schema) > 0


def test_a_json_array_record_without_a_field_is_named_by_its_index(tmp_path):
    path = tmp_path / "mathqa.json"
    good = {"Problem": "p", "options": "a ) 1", "Rationale": "r", "correct": "a"}
    path.write_text(json.dumps([good, good, {k: v for k, v in good.items() if k != "correct"}], indent=1))
    with pytest.raises(DataFileError, match=r"mathqa\.json, record 2: record lacks field\(s\) \['correct'\]"):
        check_data_file(path, "dataset_name", "mathqa")


def test_a_truncated_json_array_is_located(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b')
    with pytest.raises(DataFileError, match=r"cut\.json, line 3: not valid JSON"):
        check_data_file(path, "ppl_dataset", "text")


def test_blank_lines_and_a_byte_order_mark_are_accepted(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n')
    assert check_data_file(path, "calib_dataset", "text") == 2
    array = tmp_path / "bom.json"
    array.write_bytes(b'\xef\xbb\xbf[{"text": "a"}]')
    assert check_data_file(array, "calib_dataset", "text") == 1


def test_a_record_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataFileError, match=r"line 1: is a JSON list, expected an object"):
        check_data_file(path, "dataset_name", "arc")


def test_a_json_lines_file_with_a_byte_order_mark_says_so(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    with pytest.raises(DataFileError, match="byte order mark: save it as UTF-8 without BOM"):
        check_data_file(path, "calib_dataset", "text")
