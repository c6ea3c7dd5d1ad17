"""The text task's data: documents of a .txt or JSON Lines file, as a language-modeling dataset."""

import json

import pytest

from eora_ft.data.plain_text import load_plain_text, text_sft_dataset


def test_txt_documents_are_blank_line_separated_parts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("First article.\nSecond line.\n\n\n\nSecond article.\n\n  \n")
    assert load_plain_text(str(path)) == ["First article.\nSecond line.", "Second article."]
    assert load_plain_text(str(path), limit=1) == ["First article.\nSecond line."]
    assert text_sft_dataset(["a", "b"]).column_names == ["text"]


def test_bundled_training_and_heldout_wikipedia_do_not_overlap(assets_dir):
    train = load_plain_text(str(assets_dir / "data" / "enwiki_train" / "wiki_00.txt"))
    heldout = load_plain_text(str(assets_dir / "data" / "enwiki_heldout" / "wiki_49.txt"))
    assert (len(train), len(heldout)) == (38, 76)
    assert not set(train) & set(heldout)


def test_json_without_text_or_without_content_is_refused(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_plain_text(str(path))
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        load_plain_text(str(empty))
