"""Refinement memory (issue #34 item 4): decoder layers are recomputed in the backward pass (activation
checkpointing) and a step can run in micro-batches; neither changes the gradients beyond fp32 round-off, and the
model is left as it was found."""

import contextlib
import copy

import pytest
import torch

from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
from eora_ft.compress import make_compressor
from eora_ft.init.refine import bf16_autocast_applies, refine_adapters, teacher_hidden_states
from eora_ft.init.sequential import compress_model

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setting(nano_model_and_tokenizer):
    """An RTN 2-bit nano Llama with EoRA factors, its calibration ids and both teachers."""
    original = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = torch.randint(1, 8192, (4, 32), generator=torch.Generator().manual_seed(0))
    teachers = {target: teacher_hidden_states(original, ids, 2, "cpu", target) for target in ("final", "layers")}
    model = copy.deepcopy(original)
    result = compress_model(model, ids, make_compressor("rtn", bits=2, group_size=64), ["eora"], rank=4,
                            target_modules=LINEARS, progress=False)
    peft_model = build_lora_model(model, {p: f["eora"] for p, f in result.factors.items()},
                                  lora_config(4, 4, 0.0, LINEARS))
    return peft_model, ids, teachers


def _one_step(setting, target, monkeypatch=None, **options) -> tuple[dict[str, torch.Tensor], int, dict]:
    """The gradient of one refinement step (recorded before AdamW applies it), how many times the decoder layers'
    MLPs ran (the recomputation calls them again; module hooks do not see it, so their class is patched), and
    the report."""
    peft_model, ids, teachers = setting
    model = copy.deepcopy(peft_model)
    grads: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
    calls = []
    with contextlib.ExitStack() as stack:
        if monkeypatch is not None:
            patch = stack.enter_context(monkeypatch.context())
            mlp = type(model.get_base_model().get_decoder().layers[0].mlp)
            forward = mlp.forward
            patch.setattr(mlp, "forward", lambda self, x: calls.append(1) or forward(self, x))
        report = refine_adapters(model, ids, teachers[target], steps=1, learning_rate=1e-3, batch_size=4, **options)
    return grads, len(calls), report | {"model": model}


@pytest.mark.parametrize("target", ["final", "layers"])
def test_checkpointing_recomputes_the_layers_and_keeps_the_gradients_exact(setting, target, monkeypatch):
    plain, plain_calls, plain_report = _one_step(setting, target, monkeypatch, gradient_checkpointing=False)
    checkpointed, calls, report = _one_step(setting, target, monkeypatch, gradient_checkpointing=True)
    assert plain_calls == 4 and calls == 8  # the backward pass ran each of the 4 layers again
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 4 * len(LINEARS)
    for name, grad in plain.items():  # fp32 on a CPU: the recomputation repeats the same operations
        assert torch.allclose(checkpointed[name], grad, rtol=1e-6, atol=1e-9), name
    assert report["losses"] == pytest.approx(plain_report["losses"], rel=1e-6)


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batches_give_the_whole_batch_gradient_and_loss(setting, micro_batch_size):
    """Micro-batches of 1 (four backward passes) or 3 (uneven: 3 + 1 rows) add up to the batch mean's gradient."""
    whole, _, whole_report = _one_step(setting, "layers")
    split, _, report = _one_step(setting, "layers", micro_batch_size=micro_batch_size)
    scale = max(float(g.abs().max()) for g in whole.values())
    for name, grad in whole.items():  # fp32 sums in another order: round-off of the largest entry
        assert torch.allclose(split[name], grad, rtol=1e-4, atol=1e-5 * scale), name
    assert report["losses"] == pytest.approx(whole_report["losses"], rel=1e-5)
    assert report["micro_batch_size"] == micro_batch_size


def test_the_model_is_left_without_checkpointing_or_input_grad_hooks(setting):
    _, _, report = _one_step(setting, "final")
    base = report["model"].get_base_model()
    assert not any(getattr(module, "gradient_checkpointing", False) for module in base.modules())
    assert not hasattr(base, "_require_grads_hook")
    with torch.no_grad():  # and no gradient machinery left on the embeddings' output
        assert not base.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_bf16_autocast_only_on_cuda_so_cpu_fp32_values_stay():
    assert not bf16_autocast_applies(torch.device("cpu"))


def test_bad_micro_batch_size_is_named(setting):
    with pytest.raises(ValueError, match=r"refine micro_batch_size=0 must be >= 1"):
        _one_step(setting, "final", micro_batch_size=0)


@pytest.mark.parametrize("target", ["final", "layers"])
def test_a_file_backed_teacher_holds_the_same_values(nano_model_and_tokenizer, tmp_path, target):
    """``file=`` maps the teacher from disk instead of host memory (the 69 GB ``layers`` teacher at 8B); batches
    that do not divide the samples fill it too."""
    model = nano_model_and_tokenizer[0]
    ids = torch.randint(1, 8192, (5, 16), generator=torch.Generator().manual_seed(2))
    in_memory = teacher_hidden_states(model, ids, 2, "cpu", target)
    path = tmp_path / "teacher.bin"
    mapped = teacher_hidden_states(model, ids, 2, "cpu", target, file=path)
    assert torch.equal(mapped, in_memory)
    assert path.stat().st_size == in_memory.numel() * in_memory.element_size()


def test_a_step_that_runs_out_of_memory_is_retried_with_half_the_micro_batch(setting, monkeypatch):
    """The automatic split: a forward over more than 2 rows raises torch.OutOfMemoryError; the step is redone in
    micro-batches of 2 and its loss is the whole batch's."""
    whole, _, whole_report = _one_step(setting, "final")
    peft_model = setting[0]
    decoder_class = type(peft_model.get_base_model().get_decoder())
    forward = decoder_class.forward

    def small_only(self, input_ids=None, **kwargs):
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(decoder_class, "forward", small_only)
    split, _, report = _one_step(setting, "final")
    assert report["micro_batch_size"] == 2
    assert report["losses"] == pytest.approx(whole_report["losses"], rel=1e-5)
    scale = max(float(g.abs().max()) for g in whole.values())
    assert all(torch.allclose(split[n], g, rtol=1e-4, atol=1e-5 * scale) for n, g in whole.items())


@pytest.mark.gpu
def test_on_a_gpu_refinement_runs_under_bf16_autocast_with_checkpointing(setting):
    peft_model, ids, teachers = setting
    exact = refine_adapters(copy.deepcopy(peft_model).to("cuda"), ids, teachers["layers"], steps=3,
                            learning_rate=1e-3, batch_size=4, autocast=False)
    fast = refine_adapters(copy.deepcopy(peft_model).to("cuda"), ids, teachers["layers"], steps=3,
                           learning_rate=1e-3, batch_size=4)  # bf16 autocast and checkpointing by default
    assert bf16_autocast_applies(torch.device("cuda"))
    assert fast["losses"][0] == pytest.approx(exact["losses"][0], rel=5e-2)  # bf16 operands, fp32 loss
    assert all(torch.isfinite(torch.tensor(fast["losses"])))
