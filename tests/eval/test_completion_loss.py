"""The held-out completion loss: what the model's own loss gives on the same labels, whatever the batching."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from eora_ft.eval.completion_loss import completion_loss

NANO = "eora_ft/assets/models/nano-llama-5m"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(NANO, dtype=torch.float32)


def _examples(n=7):
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 5 + 3 * i
        ids = torch.randint(0, 8000, (length,), generator=generator).tolist()
        start = length // 2
        rows.append({"input_ids": ids, "completion_mask": [0] * start + [1] * (length - start)})
    return rows


def _reference(model, rows):
    """Token-weighted mean of the model's own (HF) loss: labels -100 outside the completion."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])]])
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count, count


def test_equals_the_models_own_loss_token_weighted(model):
    rows = _examples()
    expected, count = _reference(model, rows)
    result = completion_loss(model, rows, batch_size=3, progress=False)
    assert result["tokens"] == count and result["examples"] == len(rows)
    # fp32 logits, fp64 sums: agreement to fp32 rounding of a mean of ~40 terms
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_batching_and_padding_do_not_change_it(model):
    rows = _examples()
    one = completion_loss(model, rows, batch_size=1, progress=False)["loss"]
    many = completion_loss(model, rows, batch_size=7, pad_token_id=5, progress=False)["loss"]
    assert many == pytest.approx(one, rel=1e-5)


def test_no_loss_token_gives_nan_and_the_model_mode_is_kept(model):
    model.train()
    result = completion_loss(model, [{"input_ids": [1, 2, 3], "completion_mask": [1, 0, 0]}], progress=False)
    assert math.isnan(result["loss"]) and result["tokens"] == 0 and model.training
    model.eval()


def test_chunked_log_softmax_gives_the_same_loss(model, monkeypatch):
    import eora_ft.eval.completion_loss as module

    rows = _examples()
    whole = completion_loss(model, rows, batch_size=7, progress=False)["loss"]
    monkeypatch.setattr(module, "CHUNK_ROWS", 5)
    assert completion_loss(model, rows, batch_size=7, progress=False)["loss"] == pytest.approx(whole, rel=1e-6)
