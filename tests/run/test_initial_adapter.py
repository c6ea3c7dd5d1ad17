"""Checks the initial adapter makes before any work: a refinement teacher the host cannot hold is refused."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eora_ft.run import initial_adapter as module


def _model(dtype=torch.bfloat16):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).to(dtype)


def test_teacher_bytes_follow_the_target():
    calib = torch.zeros(4, 16, dtype=torch.long)
    model = _model()
    assert module.teacher_bytes(model, calib, "final") == 4 * 16 * 32 * 4  # fp32 final hidden states
    assert module.teacher_bytes(model, calib, "layers") == 4 * 16 * 32 * 3 * 2  # every layer, bf16


def test_a_teacher_larger_than_the_host_is_refused_naming_what_fits(monkeypatch):
    calib = torch.zeros(4, 16, dtype=torch.long)
    model = _model()

    class Memory:
        available = 2 * 4 * 16 * 32 * 4  # the final teacher fits in half of it, the layers one does not

    monkeypatch.setattr("psutil.virtual_memory", lambda: Memory())
    module.check_teacher_fits(model, calib, "final")
    with pytest.raises(ValueError, match=r"refine_target='layers' keeps 0\.0 GB .* use refine_target: final"):
        module.check_teacher_fits(model, calib, "layers")
