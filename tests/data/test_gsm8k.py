"""GSM8K formatting, few-shot sampling and answer extraction (lm-evaluation-harness `gsm8k` semantics)."""

import pytest

from eora_ft.data.gsm8k import (
    INVALID,
    MathWordProblem,
    extract_flexible,
    extract_strict,
    fewshot_contexts,
    gsm8k_sft_dataset,
    load_gsm8k,
    normalise,
)


def _items(n, prefix="q"):
    return [MathWordProblem(f"{prefix}{i}", f"{prefix} question {i}?", f"step {i}\n#### {i}") for i in range(n)]


def test_bundled_files_load(assets_dir):
    train = load_gsm8k(str(assets_dir / "data" / "gsm8k" / "train_head1000.jsonl"))
    test = load_gsm8k(str(assets_dir / "data" / "gsm8k" / "test_head500.jsonl"), limit=10)
    assert len(train) == 1000 and len(test) == 10
    assert train[0].answer.endswith("#### 72")


def test_sft_completion_is_the_full_solution():
    data = gsm8k_sft_dataset(_items(2))
    assert data[1]["prompt"] == "Question: q question 1?\nAnswer:"
    assert data[1]["completion"] == " step 1\n#### 1"


@pytest.mark.parametrize("text,strict,flexible", [
    ("She pays 3 * 4 = 12.\n#### 12", "12", "12"),
    ("The answer is $1,234.", INVALID, "$1,234."),
    ("#### -5 and later 7", "-5", "7"),
    ("no numbers here", INVALID, INVALID),
])
def test_extraction(text, strict, flexible):
    assert extract_strict(text) == strict and extract_flexible(text) == flexible


def test_normalise_matches_reference_and_extraction():
    assert normalise("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert normalise(extract_flexible("so $1,234.")) == normalise("...\n#### 1234") == "1234"


def test_fewshot_contexts_are_seeded_distinct_and_exclude_the_item():
    pool, items = _items(20, "p"), _items(3, "t")
    first, again = fewshot_contexts(items, pool), fewshot_contexts(items, pool)
    assert first == again and len(set(first)) == 3
    blocks = first[0].split("\n\n")
    assert len(blocks) == 6 and blocks[-1] == "Question: t question 0?\nAnswer:"
    assert all(b.startswith("Question: p question") and "\n#### " in b for b in blocks[:5])
    # evaluating on the pool itself: an item never shows up among its own examples
    for item, context in zip(pool, fewshot_contexts(pool, pool)):
        assert context.count(item.question) == 1
    with pytest.raises(ValueError, match="num_fewshot=5 needs at least 6"):
        fewshot_contexts(items, pool[:5])
