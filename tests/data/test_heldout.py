"""Perplexity texts: each named after itself, the bundled C4 held-out slice disjoint from calibration."""

import json

import pytest

from eora_ft.config import CompressionArguments, TaskArguments
from eora_ft.data.heldout import BUNDLED_PATHS, DEFAULT_PPL_DATASETS, corpus_text, heldout_texts
from eora_ft.run.inputs import validate_sources


def test_bundled_texts_get_their_own_metric_names_in_order():
    texts = heldout_texts(DEFAULT_PPL_DATASETS)
    assert [t.metric[0] for t in texts] == ["enwiki_heldout/ppl", "c4_heldout/ppl", "wikitext2/ppl"]
    assert [t.metric[1] for t in texts] == ["enwiki held-out ppl", "C4 held-out ppl", "WikiText-2 ppl"]
    assert heldout_texts(None) == [] and heldout_texts(" , ") == []


def test_other_files_are_named_after_their_stem_and_names_must_differ(tmp_path):
    (text,) = heldout_texts(str(tmp_path / "My Corpus-v2.txt"))
    assert text.metric == ("my_corpus_v2/ppl", "My Corpus-v2 ppl", "ppl")
    with pytest.raises(ValueError, match=r"metric name\(s\) \['wikitext2'\]"):
        heldout_texts(f"{BUNDLED_PATHS['wikitext2']},/elsewhere/wikitext-2-raw-v1.test.joined.txt")


def test_json_lines_text_is_its_records_joined(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["one", " ", "two"]) + "\n")
    assert corpus_text(str(path)) == "one\n\ntwo"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' field"):
        corpus_text(str(bad))


def test_c4_calibration_and_heldout_share_no_document(assets_dir):
    def documents(name):
        return [json.loads(line)["text"] for line in (assets_dir / "data" / "c4" / name).read_text().splitlines()]

    calib, heldout = documents("c4_en_train_calib900.jsonl"), documents("c4_en_train_heldout100.jsonl")
    assert (len(calib), len(heldout)) == (900, 100)
    assert not set(calib) & set(heldout)


def test_calibrating_on_a_perplexity_text_is_refused_before_work():
    task = TaskArguments()
    with pytest.raises(ValueError, match="calib_dataset includes .*c4_en_train_heldout100.jsonl"):
        validate_sources(task, CompressionArguments(calib_dataset=BUNDLED_PATHS["c4_heldout"]))
    validate_sources(task, CompressionArguments())  # the defaults are disjoint
    text_task = TaskArguments(task="text", dataset_name=BUNDLED_PATHS["enwiki_heldout"],
                              eval_dataset_name=BUNDLED_PATHS["enwiki_heldout"])
    with pytest.raises(ValueError, match="dataset_name includes .*wiki_49"):  # training on it leaks it too
        validate_sources(text_task, CompressionArguments())


@pytest.mark.parametrize("name", ["heldout", "notes.md", "corpus.text"])
def test_a_text_file_with_any_suffix_but_json_is_text(tmp_path, name):
    """`--data wikitext2=/data/heldout`, `ppl_dataset: mytext`: a UTF-8 file that is not .json/.jsonl is plain text
    (issue #32: it was refused with a message about our internals), for perplexity and calibration alike."""
    from eora_ft.data.calibration import _documents

    path = tmp_path / name
    path.write_text("First paragraph, with words.\n\nSecond paragraph.\n", encoding="utf-8")
    (text,) = heldout_texts(str(path))
    assert text.read() == path.read_text() and text.metric[0] == f"{name.split('.')[0]}/ppl"  # named after its stem
    assert _documents(str(path)) == ["First paragraph, with words.", "Second paragraph.\n"]
    calib = tmp_path / f"calib-{name}"
    calib.write_text("Calibration text, another file.\n", encoding="utf-8")
    validate_sources(TaskArguments(ppl_dataset=str(path)), CompressionArguments(calib_dataset=str(calib)))


def test_a_file_that_is_neither_text_nor_json_says_what_is_accepted(tmp_path):
    path = tmp_path / "heldout.bin"
    path.write_bytes(b"PAR1\x00\x15\x04" + bytes(range(128, 256)))  # parquet's magic, then binary
    with pytest.raises(ValueError, match=r"heldout\.bin, line 1: holds NUL bytes: it is a binary file, not text; "
                                         r"accepted: UTF-8 text \(any suffix but \.json/\.jsonl"):
        validate_sources(TaskArguments(ppl_dataset=str(path)), CompressionArguments())
    latin = tmp_path / "latin1"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"byte 0xe9 at column 4 is not UTF-8; save the file as UTF-8; accepted"):
        corpus_text(str(latin))
