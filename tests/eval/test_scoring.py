import math
from types import SimpleNamespace

import pytest
import torch

from eora_ft.data.arc import MultipleChoiceItem, arc_prompt, load_arc
from eora_ft.data.sources import read_text
from eora_ft.eval.scoring import (
    encode_pair,
    evaluate_stage,
    loglikelihoods,
    perplexity,
    score_multiple_choice,
)


class UniformLM(torch.nn.Module):
    """Causal-LM stand-in whose logits are all zero: every token has probability 1/vocab."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=1024)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size) + self.anchor)


@pytest.fixture(scope="module")
def wikitext(assets_dir):
    return read_text(str(assets_dir / "data" / "wikitext2" / "wikitext-2-raw-v1.test.joined.txt"))


def _reference_loglik(model, ctx, cont, max_length=None):
    # Independent computation: one unpadded forward over the full sequence.
    full = ctx + cont
    if max_length is not None:
        full = full[-(max_length + 1) :]
    with torch.no_grad():
        logprobs = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    n = len(full)
    return sum(float(logprobs[p - 1, full[p]]) for p in range(n - len(cont), n))


def test_encode_pair_matches_lm_eval(nano_model_and_tokenizer):
    _, tok = nano_model_and_tokenizer
    ctx, cont = encode_pair(tok, "Question: Why?\nAnswer:", " Because")
    assert ctx == tok("Question: Why?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("Question: Why?\nAnswer: Because", add_special_tokens=False)["input_ids"]
    # Trailing context whitespace moves onto the continuation.
    ctx2, cont2 = encode_pair(tok, "Answer: ", "yes")
    assert ctx2 == tok("Answer:", add_special_tokens=False)["input_ids"]
    assert tok.decode(cont2) == " yes"
    # Empty context: the EOS/eot token is the prefix; no BOS is ever added otherwise.
    assert encode_pair(tok, "", " yes")[0] == [tok.eos_token_id]
    assert tok.eos_token_id not in ctx + cont


def test_loglik_equals_full_sequence_computation(nano_model_and_tokenizer):
    model, tok = nano_model_and_tokenizer
    item = MultipleChoiceItem(
        id="hand", question="Which gas do plants absorb from the air?",
        choices=["carbon dioxide", "oxygen", "a very long and unusual answer about nitrogen"], gold=0,
    )
    requests = [(arc_prompt(item), " " + c) for c in item.choices] + [("The sky is", " blue")]
    got = loglikelihoods(model, tok, requests, batch_size=3, progress=False)  # mixed lengths: padding
    for (context, continuation), value in zip(requests, got):
        ref = _reference_loglik(model, *encode_pair(tok, context, continuation))
        assert value == pytest.approx(ref, abs=1e-3)
        assert value < 0

    # Left truncation to max_length keeps the continuation and the nearest context.
    ctx, cont = encode_pair(tok, *requests[2])
    short = loglikelihoods(model, tok, [requests[2]], max_length=len(cont) + 3, progress=False)[0]
    assert short == pytest.approx(_reference_loglik(model, ctx, cont, max_length=len(cont) + 3), abs=1e-3)

    scores = score_multiple_choice(model, tok, [item], progress=False)
    best = max(range(3), key=lambda i: got[i])
    assert scores["acc"] == float(best == 0) and scores["n"] == 1


def test_scoring_rules_on_uniform_model(nano_model_and_tokenizer):
    _, tok = nano_model_and_tokenizer
    model = UniformLM(vocab_size=len(tok))
    lengths = [len(encode_pair(tok, "Q:", " " + c)[1]) for c in ["the", "and", "photosynthesis"]]
    assert lengths[0] == lengths[1] == 1 and lengths[2] > 1
    # Uniform logits: loglik = -n_tokens * log(V). acc: the 1-token choices tie and argmax takes
    # the first; acc_norm divides by len(choice) (3 chars) so "photosynthesis" (14 chars) wins.
    items = [MultipleChoiceItem("t", "Q", ["the", "and", "photosynthesis"], gold=0)]
    scores = score_multiple_choice(model, tok, items, prompt_fn=lambda it: "Q:", progress=False)
    assert scores == {"acc": 1.0, "acc_norm": 0.0, "n": 1}
    items[0].gold = 2
    scores = score_multiple_choice(model, tok, items, prompt_fn=lambda it: "Q:", progress=False)
    assert scores == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_uniform_model_perplexity_is_vocab_size(nano_model_and_tokenizer, wikitext):
    _, tok = nano_model_and_tokenizer
    result = perplexity(UniformLM(vocab_size=8192), tok, wikitext[:20000], window=64, max_windows=5, progress=False)
    assert result["ppl"] == pytest.approx(8192, rel=1e-5)  # fp32 log-softmax rounding only
    assert result["windows"] == 5 and result["tokens"] == 320


def test_perplexity_matches_model_card(nano_model_and_tokenizer, wikitext):
    model, tok = nano_model_and_tokenizer
    result = perplexity(model, tok, wikitext, window=512, max_windows=40, progress=False)
    assert result["windows"] == 40 and result["tokens"] == 40 * 512
    assert abs(result["ppl"] - 441) <= 3, result


def test_perplexity_too_short_text(nano_model_and_tokenizer):
    model, tok = nano_model_and_tokenizer
    with pytest.raises(ValueError, match="window=512"):
        perplexity(model, tok, "a short text", window=512, progress=False)


def test_arc_challenge_dev_matches_model_card(nano_model_and_tokenizer, assets_dir):
    # Model card: lm-evaluation-harness 0.4.13 zero-shot, acc 21.7%, acc_norm 27.8% on 299 items.
    model, tok = nano_model_and_tokenizer
    items = load_arc(str(assets_dir / "data" / "arc" / "ARC-Challenge" / "ARC-Challenge-Dev.jsonl"))
    scores = score_multiple_choice(model, tok, items, batch_size=16, progress=False)
    assert scores["n"] == 299
    assert abs(scores["acc"] - 0.217) <= 0.02, scores
    assert abs(scores["acc_norm"] - 0.278) <= 0.02, scores


def test_evaluate_stage_keys_and_mode_restored(nano_model_and_tokenizer, assets_dir, wikitext):
    model, tok = nano_model_and_tokenizer
    items = load_arc(str(assets_dir / "data" / "arc" / "ARC-Challenge" / "ARC-Challenge-Dev.jsonl"), limit=4)
    model.train()
    try:
        metrics = evaluate_stage(model, tok, items, wikitext[:50000], ppl_window=128, ppl_max_windows=2,
                                 batch_size=8, progress=False)
        assert model.training
    finally:
        model.eval()
    assert set(metrics) == {"arc_challenge/acc", "arc_challenge/acc_norm", "arc_challenge/n", "wikitext2/ppl"}
    assert metrics["arc_challenge/n"] == 4 and math.isfinite(metrics["wikitext2/ppl"])
    only_ppl = evaluate_stage(model, tok, None, wikitext[:50000], ppl_window=128, ppl_max_windows=1,
                              batch_size=8, progress=False)
    assert set(only_ppl) == {"wikitext2/ppl"}
    assert evaluate_stage(model, tok, None, None, ppl_window=128, ppl_max_windows=1, batch_size=8, progress=False) == {}


def test_prefix_tokenization_keeps_exactly_the_whole_texts_tokens(nano_model_and_tokenizer, assets_dir):
    from eora_ft.data.heldout import DEFAULT_PPL_DATASETS, heldout_texts
    from eora_ft.eval.scoring import _encode, encode_prefix

    _, tok = nano_model_and_tokenizer
    for text in heldout_texts(DEFAULT_PPL_DATASETS):
        content = text.read()
        full = _encode(tok, content)
        for n in (1, 512, 40 * 512):
            assert encode_prefix(tok, content, n) == full[:n], (text.name, n)
        assert encode_prefix(tok, content, None) == full
        assert encode_prefix(tok, content, len(full) + 10) == full  # more than there is: all of it
