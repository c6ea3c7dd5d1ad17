import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from eora_ft.data.calibration import calibration_tokens, describe_calibration
from eora_ft.data.sources import load_records


@pytest.fixture(scope="module")
def tokenizer(assets_dir):
    return AutoTokenizer.from_pretrained(assets_dir / "models" / "nano-llama-5m")


@pytest.fixture(scope="module")
def c4_path(assets_dir):
    return str(assets_dir / "data" / "c4" / "c4_en_train_calib900.jsonl")


def _contains(haystack: list[int], needle: list[int]) -> bool:
    # Byte search over int32 encodings; an aligned hit is a real token-level match.
    hay, ndl = np.asarray(haystack, np.int32).tobytes(), np.asarray(needle, np.int32).tobytes()
    pos = hay.find(ndl)
    while pos != -1:
        if pos % 4 == 0:
            return True
        pos = hay.find(ndl, pos + 1)
    return False


def test_shape_dtype_and_seed(tokenizer, c4_path):
    a = calibration_tokens(tokenizer, c4_path, num_samples=6, seq_len=128, seed=0)
    assert a.shape == (6, 128) and a.dtype == torch.long
    assert torch.equal(a, calibration_tokens(tokenizer, c4_path, num_samples=6, seq_len=128, seed=0))
    assert not torch.equal(a, calibration_tokens(tokenizer, c4_path, num_samples=6, seq_len=128, seed=1))
    assert describe_calibration(a) == {"num_samples": 6, "seq_len": 128, "tokens": 768}


def test_rows_are_windows_of_single_documents(tokenizer, c4_path):
    rows = calibration_tokens(tokenizer, c4_path, num_samples=8, seq_len=256, seed=3)
    docs = tokenizer(list(load_records(c4_path)["text"]), add_special_tokens=False, verbose=False)["input_ids"]
    long_docs = [d for d in docs if len(d) > 256]
    for row in rows.tolist():
        assert any(_contains(d, row) for d in long_docs)
    # GPTQ-style sampling never crosses a document boundary, so no EOS separator shows up.
    assert not (rows == tokenizer.eos_token_id).any()


def test_fallback_concatenates_short_documents(tokenizer, tmp_path):
    texts = ["The cat sat on the mat.", "A second, slightly longer document about dogs and parks.", "Third."]
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = encoded[0] + [tokenizer.eos_token_id] + encoded[1] + [tokenizer.eos_token_id] + encoded[2]
    seq_len = len(encoded[0]) + len(encoded[1])  # longer than any single document
    rows = calibration_tokens(tokenizer, str(path), num_samples=5, seq_len=seq_len, seed=0)
    assert rows.shape == (5, seq_len)
    for row in rows.tolist():
        assert _contains(stream, row)
    full = calibration_tokens(tokenizer, str(path), num_samples=1, seq_len=len(stream), seed=0)
    assert full[0].tolist() == stream


def test_text_file_source(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f" = Section {i} = \n the quick brown fox jumps over the lazy dog {i}" for i in range(50)))
    rows = calibration_tokens(tokenizer, str(path), num_samples=3, seq_len=64, seed=0)
    assert rows.shape == (3, 64)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_samples": 0, "seq_len": 16}, "num_samples=0"),
        ({"num_samples": 2, "seq_len": 1}, "seq_len=1"),
        ({"num_samples": 2, "seq_len": 10_000}, r"calibration set of \d+ tokens is shorter than seq_len=10000"),
    ],
)
def test_bad_sizes_are_clear(tokenizer, tmp_path, kwargs, expected):
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"text": "only a few words here"}) + "\n")
    with pytest.raises(ValueError, match=expected):
        calibration_tokens(tokenizer, str(path), **kwargs)


def test_missing_source(tokenizer):
    with pytest.raises(FileNotFoundError, match="no_such_corpus.jsonl"):
        calibration_tokens(tokenizer, "./no_such_corpus.jsonl", num_samples=1, seq_len=8)


def test_mixed_calibration_takes_the_task_share(nano_model_and_tokenizer, assets_dir):
    from eora_ft.data import mixed_calibration

    _, tokenizer = nano_model_and_tokenizer
    texts = [f"Question: what is {i} plus {i}?\nAnswer: {2 * i}" for i in range(200)]
    corpus = str(assets_dir / "data" / "c4" / "c4_en_train_calib900.jsonl")
    mixed = mixed_calibration(tokenizer, corpus, texts, 8, 64, task_fraction=0.5, seed=0)
    assert mixed.shape == (8, 64) and mixed.dtype == torch.long
    decoded = [tokenizer.decode(row) for row in mixed]
    assert sum("Question: what is" in text for text in decoded) == 4  # the last four rows are task text
    assert all("Question: what is" in text for text in decoded[4:])
    only_corpus = mixed_calibration(tokenizer, corpus, texts, 8, 64, task_fraction=0.0, seed=0)
    assert torch.equal(only_corpus[:4], mixed[:4])  # corpus rows first, drawn in the same order
    with pytest.raises(ValueError, match="calib_task_fraction=1.5"):
        mixed_calibration(tokenizer, corpus, texts, 8, 64, task_fraction=1.5)


def test_two_corpora_share_the_rows(nano_model_and_tokenizer, assets_dir):
    from eora_ft.data import mixed_calibration

    _, tokenizer = nano_model_and_tokenizer
    c4 = str(assets_dir / "data" / "c4" / "c4_en_train_calib900.jsonl")
    wiki = str(assets_dir / "data" / "wikitext2" / "wikitext-2-raw-v1.test.joined.txt")
    both = mixed_calibration(tokenizer, f"{c4},{wiki}", [], 5, 32, seed=0)
    assert both.shape == (5, 32)
    assert torch.equal(both[:3], mixed_calibration(tokenizer, c4, [], 3, 32, seed=0))
    assert torch.equal(both[3:], mixed_calibration(tokenizer, wiki, [], 2, 32, seed=0))
