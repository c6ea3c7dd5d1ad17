"""The model-level refinement: only the factors move, and the compressed model's hidden states get closer to
the uncompressed model's on the calibration text."""

import copy

import pytest
import torch

from eora_ft.compress import make_compressor
from eora_ft.init.sequential import compress_model
from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
from eora_ft.init.refine import refine_adapters, teacher_hidden_states

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_refinement_lowers_the_hidden_state_error_and_moves_only_the_factors(nano_model_and_tokenizer):
    original = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = torch.randint(1, 8192, (4, 64), generator=torch.Generator().manual_seed(0))
    teacher = teacher_hidden_states(original, ids, batch_size=2, device="cpu")
    assert teacher.shape == (4, 64, 256) and teacher.dtype == torch.float32
    model = copy.deepcopy(original)
    result = compress_model(model, ids, make_compressor("rtn", bits=2, group_size=64), ["eora"], rank=4,
                            target_modules=LINEARS, progress=False)
    peft_model = build_lora_model(model, {p: f["eora"] for p, f in result.factors.items()}, lora_config(4, 4, 0.0, LINEARS))
    frozen = {n: t.clone() for n, t in peft_model.state_dict().items() if "lora_" not in n}
    factors = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    def hidden_error() -> float:
        with torch.no_grad():
            hidden = peft_model.get_base_model().get_decoder()(input_ids=ids).last_hidden_state
        return float((hidden - teacher).pow(2).mean() / teacher.pow(2).mean())

    before = hidden_error()
    report = refine_adapters(peft_model, ids, teacher, steps=40, learning_rate=1e-3, batch_size=2)
    after = hidden_error()
    assert len(report["losses"]) == 40 and after < 0.9 * before  # measured here: about half
    assert all(torch.equal(t, peft_model.state_dict()[n]) for n, t in frozen.items())
    assert any(not torch.equal(p, factors[n]) for n, p in peft_model.named_parameters() if p.requires_grad)


def test_layers_target_holds_every_decoder_layer_and_its_loss_falls(nano_model_and_tokenizer):
    original = copy.deepcopy(nano_model_and_tokenizer[0])
    layers = original.config.num_hidden_layers
    ids = torch.randint(1, 8192, (4, 32), generator=torch.Generator().manual_seed(1))
    teacher = teacher_hidden_states(original, ids, batch_size=2, device="cpu", target="layers")
    final = teacher_hidden_states(original, ids, batch_size=2, device="cpu")
    assert teacher.shape == (4, layers, 32, 256) and teacher.dtype == torch.float32  # the model's dtype
    assert torch.equal(teacher[:, -1], final)  # the last layer's entry is the decoder's (normed) output
    assert not torch.allclose(teacher[:, 0], teacher[:, 1])  # distinct layers, not one repeated
    model = copy.deepcopy(original)
    result = compress_model(model, ids, make_compressor("rtn", bits=2, group_size=64), ["eora"], rank=4,
                            target_modules=LINEARS, progress=False)
    peft_model = build_lora_model(model, {p: f["eora"] for p, f in result.factors.items()}, lora_config(4, 4, 0.0, LINEARS))
    report = refine_adapters(peft_model, ids, teacher, steps=40, learning_rate=1e-3, batch_size=4)
    assert report["loss_last"] < 0.9 * report["loss_first"]  # full batch, so the loss is the objective itself


def test_unknown_refine_target_is_named():
    with pytest.raises(ValueError, match=r"refine_target='hidden' is unknown; valid: \['final', 'layers'\]"):
        teacher_hidden_states(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 1, "cpu", target="hidden")
