"""GSM8K generation scoring: batching does not change greedy answers; extraction decides the score."""

import pytest

import eora_ft.eval.generation as generation
from eora_ft.data.gsm8k import MathWordProblem
from eora_ft.eval.generation import generate_until, score_gsm8k


def _problems(n):
    return [MathWordProblem(str(i), f"What is {i} plus {i}?", f"{i}+{i}={2 * i}\n#### {2 * i}") for i in range(n)]


def test_left_padded_batches_equal_one_by_one(nano_model_and_tokenizer):
    model, tokenizer = nano_model_and_tokenizer
    contexts = ["Question: What is two plus two?\nAnswer:", "The capital of France is",
                "Question: A farmer has 12 cows and buys 30 more. How many cows does he have now?\nAnswer:"]
    batched = generate_until(model, tokenizer, contexts, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate_until(model, tokenizer, [c], max_new_tokens=12, batch_size=1, progress=False)[0]
              for c in contexts]
    assert batched == single
    assert all("Question:" not in text for text in batched)  # cut at the stop string


def test_context_longer_than_the_window_is_cut_from_the_left(nano_model_and_tokenizer):
    model, tokenizer = nano_model_and_tokenizer
    long_context = "word " * 3000 + "\nQuestion: 1+1?\nAnswer:"
    out = generate_until(model, tokenizer, [long_context], max_new_tokens=4, progress=False)
    assert isinstance(out[0], str)
    with pytest.raises(ValueError, match="max_new_tokens=5000 leaves no room"):
        generate_until(model, tokenizer, ["x"], max_new_tokens=5000, progress=False)


@pytest.mark.parametrize("answer_text,strict,flexible", [
    ("{gold_solution}", 1.0, 1.0),                       # the reference solution itself
    ("so the total is {gold}.", 0.0, 1.0),               # right number, no '#### '
    ("#### {gold}\nthen 999", 1.0, 0.0),                 # strict takes the first '####', flexible the last number
    ("I do not know", 0.0, 0.0),
])
def test_score_gsm8k_extractions(monkeypatch, answer_text, strict, flexible):
    items = _problems(6)

    def fake_generate(model, tokenizer, contexts, *args, **kwargs):
        out = []
        for context in contexts:
            item = next(it for it in items if context.endswith(f"Question: {it.question}\nAnswer:"))
            gold = item.answer.split("#### ")[-1]
            out.append(answer_text.format(gold_solution=item.answer, gold=gold))
        return out

    monkeypatch.setattr(generation, "generate_until", fake_generate)
    metrics = score_gsm8k(None, None, items[:3], fewshot_pool=items, num_fewshot=2)
    assert metrics == {"strict": strict, "flexible": flexible, "n": 3}
