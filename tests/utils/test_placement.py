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


def test_a_model_too_big_for_one_gpu_is_spread_over_the_node_when_they_hold_it(nano_model_and_tokenizer):
    """The device map keeps decoder layers whole, uses only the GPUs given, and is None when together they are
    too small (then the model would stream over PCIe)."""
    from eora_ft.utils.placement import spread_map

    model = nano_model_and_tokenizer[0]
    size = model_bytes(model)
    device_map = spread_map(model, {0: int(0.8 * size), 1: int(0.8 * size)})
    assert device_map is not None and set(device_map.values()) == {0, 1}
    for name in device_map:  # no decoder layer is cut in two
        assert not name.startswith("model.layers.") or name.count(".") == 2, name
    assert spread_map(model, {0: int(0.4 * size), 1: int(0.4 * size)}) is None
    assert spread_map(model, {0: 10 * size}) is None  # one GPU: moved, never spread


def test_placed_for_inference_spreads_before_it_streams(nano_model_and_tokenizer, monkeypatch):
    """On a GPU node, a model that does not fit one GPU but fits the node goes to ``spread``; streaming (every
    forward over PCIe) is the last resort, and the recipe skips evaluating a base that would stream."""
    import contextlib

    from eora_ft.utils import placement as module

    model = nano_model_and_tokenizer[0]
    used = []
    monkeypatch.setattr(module, "fits_on", lambda model, device: False)
    monkeypatch.setattr(module, "spread", lambda model, device_map: contextlib.nullcontext(used.append("spread")))
    monkeypatch.setattr(module, "streamed", lambda model, device: contextlib.nullcontext(used.append("streamed")))
    size = model_bytes(model)
    monkeypatch.setattr(module, "accelerator_budgets", lambda: {0: size, 1: size})
    with module.placed_for_inference(model, "meta"):
        pass
    monkeypatch.setattr(module, "accelerator_budgets", lambda: {0: size // 4, 1: size // 4})
    assert module.placement(model, "meta")[0] == "streamed"
    with module.placed_for_inference(model, "meta"):
        pass
    assert used == ["spread", "streamed"]
    assert "GB over PCIe" in module.streaming_note(model, "cuda:0")
