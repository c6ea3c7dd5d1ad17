"""Every tensor eora_ft creates is placed where the data it meets lives, checked without a GPU.

With ``torch.set_default_device("meta")`` while the model and the data live on the CPU, a tensor that
our code creates without an explicit device lands on ``meta``, and mixing it with the CPU data
raises, exactly as a CPU tensor meeting CUDA data would on a GPU. The whole path runs under it:
every compressor x every initializer, the PEFT wrap, two training steps through the packed kernel
path, save and reload, an evaluation batch (multiple choice and perplexity).

Where a library outside eora_ft creates tensors on the default device itself, the scope is narrowed
to exclude that call (``_outside_eora_ft``), and the place is named:
- building the model (transformers' ``__init__`` creates its rotary buffers on the default device);
- bitsandbytes quantizing to NF4 (``Params4bit`` creates its quant state on the default device), and
  serialising and restoring that quant state (``pack_dict_to_tensor``, ``Params4bit.from_prequantized``);
- the optimizer step (torch's AdamW creates its ``step`` counters on the default device);
- PEFT creating the LoRA modules (``nn.Linear`` on the default device, moved to the base layer's device
  afterwards, which ``test_adapters_follow_the_base_layer_device`` checks on its own).
"""

import contextlib
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from eora_ft.compress import COMPRESSORS, CompressedLinear, make_compressor
from eora_ft.compress import nf4 as nf4_module
from eora_ft.compress.experts import unfuse_experts
from eora_ft.compress.io import load_compressed, save_compressed
from eora_ft.init.sequential import compress_model
from eora_ft.data.arc import MultipleChoiceItem
from eora_ft.eval.scoring import perplexity, score_multiple_choice
from eora_ft.init import INITIALIZERS
from eora_ft.adapters import peft_bridge
from eora_ft.adapters.peft_bridge import build_lora_model, load_adapter, lora_config, save_adapter

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIONS = {"rtn": {"bits": 3, "group_size": 64}, "gptq": {"bits": 2, "group_size": 64, "act_order": True},
           "sparsegpt": {"sparsity": "2:4"}, "wanda": {"sparsity": "4:8"},
           "gptq+sparsegpt": {"bits": 4, "group_size": 64, "sparsity": "2:4"}, "nf4": {}}


@contextlib.contextmanager
def _default_device_meta():
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


@contextlib.contextmanager
def _outside_eora_ft():
    """A library call that creates tensors on the default device: run it with the CPU as default."""
    with torch.device("cpu"):
        yield


@pytest.fixture(scope="module")
def small_model(assets_dir):
    """The nano model's architecture with 2 layers (random weights): the real tokenizer, a fast run."""
    config = AutoConfig.from_pretrained(assets_dir / "models" / "nano-llama-5m")
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    with _outside_eora_ft():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _with_cpu_default(function):
    def wrapped(*args, **kwargs):
        with _outside_eora_ft():
            return function(*args, **kwargs)

    return wrapped


@pytest.fixture(autouse=True)
def _libraries_create_on_the_cpu(monkeypatch):
    import bitsandbytes.functional
    import bitsandbytes.nn

    monkeypatch.setattr(nf4_module.NF4, "compress", _with_cpu_default(nf4_module.NF4.compress))
    monkeypatch.setattr(bitsandbytes.functional, "pack_dict_to_tensor",
                        _with_cpu_default(bitsandbytes.functional.pack_dict_to_tensor))
    params4bit = bitsandbytes.nn.Params4bit
    monkeypatch.setattr(params4bit, "from_prequantized",
                        classmethod(_with_cpu_default(params4bit.from_prequantized.__func__)))
    monkeypatch.setattr(peft_bridge, "get_peft_model", _with_cpu_default(peft_bridge.get_peft_model))
    monkeypatch.setattr(peft_bridge.PeftModel, "from_pretrained",
                        classmethod(_with_cpu_default(peft_bridge.PeftModel.from_pretrained.__func__)))


def _train_two_steps(peft_model, ids):
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with _outside_eora_ft():
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(2):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        with _outside_eora_ft():
            optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("init", sorted(INITIALIZERS))
@pytest.mark.parametrize("method", sorted(COMPRESSORS))
def test_the_whole_path_creates_no_tensor_off_its_data_device(small_model, nano_model_and_tokenizer, tmp_path,
                                                             method, init):
    tokenizer = nano_model_and_tokenizer[1]
    model = copy.deepcopy(small_model)
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(1), device="cpu")
    items = [MultipleChoiceItem(id="q1", question="What melts ice?", choices=["heat", "cold", "salt water"],
                                gold=0)]
    with _default_device_meta():
        result = compress_model(model, ids, make_compressor(method, **OPTIONS[method]), [init], rank=4,
                                target_modules=LINEARS, base_from=init, init_options={"loftq": {"iters": 2}},
                                progress=False, execution_device="cpu", activations_device="cpu")
        save_compressed(model, tmp_path / "base", {"method": method})
        factors = {path: per_init[init] for path, per_init in result.factors.items()}
        peft_model = build_lora_model(model, factors, lora_config(4, 8, 0.0, LINEARS))
        peft_model.train()
        losses = _train_two_steps(peft_model, ids)
        save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"))
        reloaded = load_adapter(load_compressed(tmp_path / "base"), tmp_path / "adapter")
        scores = score_multiple_choice(reloaded, tokenizer, items, batch_size=4, progress=False)
        ppl = perplexity(reloaded, tokenizer, "Ice melts when it is warm. " * 20, window=32, max_windows=2,
                         progress=False)
        peft_model.eval()
        with torch.no_grad():
            trained_logits = peft_model(input_ids=ids).logits
            reloaded_logits = reloaded(input_ids=ids).logits
    assert all(t.device.type == "cpu" for t in [*reloaded.parameters(), *reloaded.buffers()])
    assert all(torch.isfinite(torch.tensor(losses))) and 0.0 <= scores["acc"] <= 1.0 and ppl["ppl"] > 1.0
    assert torch.allclose(trained_logits, reloaded_logits, atol=1e-5, rtol=1e-5)
    if method != "nf4":
        assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == 14


@pytest.mark.parametrize("bits", [4, None])
def test_adapters_follow_the_base_layer_device(bits):
    """PEFT places new adapters on the base layer's device: with the base on ``meta`` (standing in for CUDA)
    the adapters must land there too, for quantized and for pruned-only (no ``weight``/``qweight``) layers."""
    base = CompressedLinear(64, 32, bits, 32, kept=None if bits else 1024, device="meta")
    model = torch.nn.Sequential()
    model.add_module("norm", torch.nn.LayerNorm(64, device="meta"))  # a model always has some parameter
    model.add_module("proj", base)
    peft_model = peft_bridge.get_peft_model(model, lora_config(4, 8, 0.0, ["proj"], task_type=None))
    layer = peft_model.base_model.model.proj
    assert layer.lora_A["default"].weight.device.type == "meta"
    assert layer.lora_B["default"].weight.device.type == "meta"


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_the_moe_path_creates_no_tensor_off_its_data_device(tmp_path, method):
    """Unfused experts, per-expert statistics with the all-token fallback (1 x 6 tokens leave experts unrouted),
    EoRA per expert, PEFT, training and the reload, under the meta default device."""
    from tests.compress.test_experts import qwen3_moe

    with _outside_eora_ft():
        model = qwen3_moe()
    moe_linears = [*LINEARS, "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(5), device="cpu")
    with _default_device_meta():
        unfuse_experts(model, moe_linears)
        result = compress_model(model, ids, make_compressor(method, bits=4, group_size=32), ["eora"], rank=4,
                                target_modules=moe_linears, keep_stats=True, progress=False,
                                execution_device="cpu", activations_device="cpu")
        save_compressed(model, tmp_path / "base", {"method": method})
        factors = {path: per_init["eora"] for path, per_init in result.factors.items()}
        peft_model = build_lora_model(model, factors, lora_config(4, 8, 0.0, moe_linears))
        peft_model.train()
        losses = _train_two_steps(peft_model, ids)
        save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"))
        reloaded = load_adapter(load_compressed(tmp_path / "base"), tmp_path / "adapter")
        peft_model.eval()
        with torch.no_grad():
            trained_logits = peft_model(input_ids=ids).logits
            reloaded_logits = reloaded(input_ids=ids).logits
    assert any(report["all_token_experts"] for report in result.expert_routing)
    assert all(t.device.type == "cpu" for t in [*reloaded.parameters(), *reloaded.buffers()])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert torch.allclose(trained_logits, reloaded_logits, atol=1e-5, rtol=1e-5)
