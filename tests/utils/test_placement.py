"""Evaluating a CPU-resident model on an accelerator: whole when it fits, streamed layer by layer when not."""

import copy

import torch

from eora_ft.eval.scoring import perplexity
from eora_ft.utils.placement import fits_on, model_bytes, placed_for_inference, streamed

TEXT = "The ice melts when the sun comes out, and the river rises in the spring. " * 30


def test_streamed_evaluation_equals_the_resident_one_and_restores_the_weights(nano_model_and_tokenizer):
    """accelerate's CPU offload (what a model too big for the GPU gets) gives the same numbers, and after it
    every weight is back, unchanged, ready for layer-wise compression."""
    model, tokenizer = nano_model_and_tokenizer
    model = copy.deepcopy(model)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    expected = perplexity(model, tokenizer, TEXT, window=64, max_windows=3, progress=False)["ppl"]
    with streamed(model, torch.device("cpu")):
        assert next(model.parameters()).device.type == "meta"  # the weights live in the hooks' map
        got = perplexity(model, tokenizer, TEXT, window=64, max_windows=3, progress=False)["ppl"]
    assert got == expected
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


def test_a_model_where_it_computes_stays_put(nano_model_and_tokenizer):
    model = nano_model_and_tokenizer[0]
    assert fits_on(model, torch.device("cpu"))
    assert model_bytes(model) == sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                     [*model.parameters(), *model.buffers()]}.values())
    with placed_for_inference(model, "cpu") as placed:
        assert placed is model and next(model.parameters()).device.type == "cpu"
