import json
from collections import Counter

import pytest

from eora_ft.data.arc import (
    PROMPT_TEMPLATE,
    MultipleChoiceItem,
    arc_prompt,
    arc_sft_dataset,
    load_arc,
)


@pytest.fixture(scope="module")
def arc_dir(assets_dir):
    return assets_dir / "data" / "arc" / "ARC-Challenge"


@pytest.fixture(scope="module")
def dev(arc_dir):
    return load_arc(str(arc_dir / "ARC-Challenge-Dev.jsonl"))


def test_counts_and_choice_shapes(dev, arc_dir):
    assert len(dev) == 299
    assert len(load_arc(str(arc_dir / "ARC-Challenge-Train.jsonl"))) == 1119
    sizes = Counter(len(item.choices) for item in dev)
    assert sizes[3] > 0 and sizes[5] > 0 and sizes[4] > 290
    assert all(0 <= item.gold < len(item.choices) for item in dev)
    assert len({item.id for item in dev}) == 299


def test_numeric_labels_map_through_labels(dev, arc_dir):
    raw = {}
    with open(arc_dir / "ARC-Challenge-Dev.jsonl") as f:
        for line in f:
            record = json.loads(line)
            raw[record["id"]] = record
    numeric = [r for r in raw.values() if r["question"]["choices"][0]["label"] == "1"]
    assert numeric, "expected some dev questions labelled 1-4"
    by_id = {item.id: item for item in dev}
    for record in numeric:
        item = by_id[record["id"]]
        gold_text = next(c["text"] for c in record["question"]["choices"] if c["label"] == record["answerKey"])
        assert item.choices[item.gold] == gold_text
        assert item.gold == int(record["answerKey"]) - 1
    # One concrete case: answerKey "2" is the second choice.
    item = by_id["NYSEDREGENTS_2014_8_20"]
    assert item.gold == 1


def test_hf_schema_matches_ai2_schema(tmp_path, dev, arc_dir):
    with open(arc_dir / "ARC-Challenge-Dev.jsonl") as f:
        raw = [json.loads(line) for line in f][:20]
    hf = [
        {
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in r["question"]["choices"]],
                "label": [c["label"] for c in r["question"]["choices"]],
            },
            "answerKey": r["answerKey"],
        }
        for r in raw
    ]
    path = tmp_path / "hf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hf))
    assert load_arc(str(path)) == dev[:20]


def test_limit(arc_dir, dev):
    assert load_arc(str(arc_dir / "ARC-Challenge-Dev.jsonl"), limit=7) == dev[:7]


def test_bad_answer_key_names_the_id(tmp_path):
    record = {
        "id": "broken-17",
        "question": {"stem": "Q?", "choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]},
        "answerKey": "E",
    }
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="broken-17"):
        load_arc(str(path))


def test_prompt_and_sft_dataset(dev):
    item = MultipleChoiceItem(id="x", question="What is 2+2?", choices=["three", "four"], gold=1)
    assert PROMPT_TEMPLATE == "Question: {question}\nAnswer:"
    assert arc_prompt(item) == "Question: What is 2+2?\nAnswer:"

    ds = arc_sft_dataset([item] + dev[:3])
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0] == {"prompt": "Question: What is 2+2?\nAnswer:", "completion": " four"}
    assert ds[1]["prompt"] == f"Question: {dev[0].question}\nAnswer:"
    assert ds[1]["completion"] == " Record the details of the investigation."
