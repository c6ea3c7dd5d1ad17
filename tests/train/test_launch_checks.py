"""A plain `python` start on a multi-GPU host is refused with the launch command; DDP skips the graph walk."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from eora_ft.train.launch import find_unused_parameters, refuse_data_parallel

ARGV = ["recipes/arc.py", "--config", "recipes/configs/arc_nano_gptq2_eora.yaml", "--lora_r", "32"]


def test_several_gpus_without_a_launcher_are_refused_with_the_commands_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="nn.DataParallel") as error:
        refuse_data_parallel(ARGV, environ={})
    message = str(error.value)
    assert ("accelerate launch --multi_gpu --num_processes 2 recipes/arc.py --config "
            "recipes/configs/arc_nano_gptq2_eora.yaml --lora_r 32") in message
    assert "CUDA_VISIBLE_DEVICES=0 python recipes/arc.py --config" in message


def test_a_console_script_is_shown_as_its_module(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(RuntimeError, match=r"--num_processes 8 -m eora_ft.cli arc --lora_r 8"):
        refuse_data_parallel(["/usr/bin/eora-ft", "arc", "--lora_r", "8"], environ={})


@pytest.mark.parametrize("gpus, environ, use_cpu", [
    (1, {}, False),                                  # one GPU: no DataParallel
    (0, {}, False),                                  # a CPU host
    (2, {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, False),  # accelerate launch / torchrun
    (2, {"OMPI_COMM_WORLD_LOCAL_RANK": "0"}, False),     # mpirun
    (2, {}, True),                                   # training on the CPU on purpose
])
def test_launched_single_gpu_or_cpu_runs_pass(monkeypatch, gpus, environ, use_cpu):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    refuse_data_parallel(ARGV, use_cpu=use_cpu, environ=environ)


def _peft_llama(**config):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, **config)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                               lora_dropout=0.1))


def test_every_lora_factor_of_a_dense_decoder_gets_a_gradient_every_step():
    model = _peft_llama()
    assert find_unused_parameters(model) is False
    model.train()  # with dropout on: it changes the LoRA branch's input, not whether the branch runs
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)


def test_mixture_of_experts_keeps_the_search_for_unused_parameters():
    assert find_unused_parameters(_peft_llama(num_local_experts=8)) is True  # from the config

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    model = get_peft_model(nn.Sequential(Experts()), LoraConfig(r=2, target_modules=r".*experts\.\d+"))
    assert find_unused_parameters(model) is True  # from adapters under an `experts` module
