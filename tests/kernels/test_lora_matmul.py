"""The packed LoRA autograd function against autograd through the reference, in fp64."""

import copy

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eora_ft.kernels.lora_matmul import packed_lora_linear

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradients_match_autograd_through_the_reference(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=g, dtype=torch.float64)
    bias = torch.randn(24, generator=g, dtype=torch.float64) if with_bias else None
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 64, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, 4, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(*shape[:-1], 24, generator=g, dtype=torch.float64)

    y = packed_lora_linear(x, lambda dtype: weight.to(dtype), a, b, 0.5, bias)
    fused = torch.autograd.grad(y, (x, a, b), grad_out)
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y2 = x2 @ weight.t() + 0.5 * (x2 @ a2.t()) @ b2.t() + (bias if bias is not None else 0)
    reference = torch.autograd.grad(y2, (x2, a2, b2), grad_out)
    assert torch.allclose(y, y2, atol=1e-12)
    for got, want in zip(fused, reference):
        assert torch.allclose(got, want, atol=1e-10)


def test_no_token_gives_an_empty_output_and_zero_adapter_gradients_without_touching_the_weight():
    """A mixture-of-experts expert no token was routed to is still called in training: its adapters need a
    gradient (zero) on every rank, and its packed weight must not be dequantized for nothing."""
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    x = torch.randn(0, 64, requires_grad=True)

    def weight(dtype):
        raise AssertionError("dequantized for an empty input")

    y = packed_lora_linear(x, weight, a, b, 0.5, torch.ones(24))
    assert y.shape == (0, 24) and y.dtype == x.dtype
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    assert x.grad.shape == (0, 64)


def test_adapter_layer_uses_the_fused_path_with_the_same_result(nano_model_and_tokenizer):
    from eora_ft.compress import make_compressor
    from eora_ft.init.sequential import compress_model
    from eora_ft.adapters.peft_bridge import build_lora_model, lora_config

    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    result = compress_model(model, ids, make_compressor("rtn", bits=3), ["svd"], rank=4, target_modules=linears,
                            progress=False)
    peft_model = build_lora_model(model, {p: f["svd"] for p, f in result.factors.items()}, lora_config(4, 8, 0.0, linears))
    module = peft_model.base_model.model.get_submodule("model.layers.1.mlp.down_proj")
    x = torch.randn(3, 7, 768, requires_grad=True)
    fused = module(x)
    assert module._fused_adapter({}) == "default"
    plain = super(type(module), module).forward(x)  # PEFT's own two-branch forward
    assert torch.allclose(fused, plain, atol=1e-5)
    fused.sum().backward()
    grads = [t.grad.clone() for t in (x, module.lora_A["default"].weight, module.lora_B["default"].weight)]
    for t in (x, module.lora_A["default"].weight, module.lora_B["default"].weight):
        t.grad = None
    plain.sum().backward()
    for got, t in zip(grads, (x, module.lora_A["default"].weight, module.lora_B["default"].weight)):
        assert torch.allclose(got, t.grad, atol=1e-4)
    assert module.base_layer.qweight.grad is None
    with peft_model.disable_adapter():
        assert module._fused_adapter({}) is None


def test_bf16_autocast_training_step_runs_and_matches_fp32():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 64, generator=g)
    x = torch.randn(6, 64, generator=g, requires_grad=True)
    a = (torch.randn(4, 64, generator=g) * 0.1).requires_grad_(True)
    b = (torch.randn(24, 4, generator=g) * 0.1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = packed_lora_linear(x, lambda dtype: weight.to(dtype), a, b, 2.0)
    grads = torch.autograd.grad(y.float().square().sum(), (x, a, b))
    assert [t.dtype for t in grads] == [torch.float32] * 3  # each gradient in its input's dtype
    y32 = packed_lora_linear(x, lambda dtype: weight.to(dtype), a, b, 2.0)
    grads32 = torch.autograd.grad(y32.square().sum(), (x, a, b))
    for got, want in zip(grads, grads32):
        assert torch.allclose(got, want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))


class _MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix product that runs inside it (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("free_bytes", [0, 1 << 60])  # plenty of memory: keep W_c; none: dequantize it again
def test_cpu_backward_reuses_the_forward_weight_only_while_memory_allows(monkeypatch, free_bytes):
    from eora_ft.kernels import lora_matmul

    monkeypatch.setattr(lora_matmul, "KEEP_FREE_BYTES", free_bytes)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 64, generator=g, dtype=torch.float64)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 64, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, 4, generator=g, dtype=torch.float64, requires_grad=True)
    calls = []

    def weight_fn(dtype):
        calls.append(dtype)
        return weight.to(dtype)

    y = packed_lora_linear(x, weight_fn, a, b, 0.5)
    grads = torch.autograd.grad(y.square().sum(), (x, a, b))
    assert len(calls) == (1 if free_bytes == 0 else 2)
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    want = torch.autograd.grad((x2 @ weight.t() + 0.5 * (x2 @ a2.t()) @ b2.t()).square().sum(), (x2, a2, b2))
    for got, expected in zip(grads, want):
        assert torch.allclose(got, expected, atol=1e-10)


def test_under_autocast_every_product_runs_in_the_autocast_dtype_and_nothing_fp32_is_saved():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 64, generator=g)
    x = torch.randn(6, 64, generator=g, requires_grad=True)  # an fp32 residual stream, as in an fp32 model
    a = (torch.randn(4, 64, generator=g) * 0.1).requires_grad_(True)
    b = (torch.randn(24, 4, generator=g) * 0.1).requires_grad_(True)
    saved = []
    with _MatmulDtypes() as products, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.dtype) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = packed_lora_linear(x, lambda dtype: weight.to(dtype), a, b, 2.0)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16  # what autocast's own linear returns
    assert len(products.seen) >= 6 and all(dtypes == {torch.bfloat16} for dtypes in products.seen), products.seen
    assert torch.float32 not in set(saved[:4]), saved  # x, U, A, B are kept in bf16: half the activation memory
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32  # back to the fp32 parameters


def test_the_layer_input_does_not_outlive_activation_checkpointing(nano_model_and_tokenizer):
    """The autograd graph must hold no reference to a checkpointed layer's input (a closure over x did)."""
    from eora_ft.compress import make_compressor
    from eora_ft.init.sequential import compress_model
    from eora_ft.adapters.peft_bridge import build_lora_model, lora_config

    model = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    result = compress_model(model, ids, make_compressor("rtn", bits=4), ["svd"], rank=4, target_modules=["down_proj"],
                            progress=False)
    peft_model = build_lora_model(model, {p: f["svd"] for p, f in result.factors.items()},
                                  lora_config(4, 8, 0.0, ["down_proj"]))
    layer = peft_model.base_model.model.get_submodule("model.layers.0.mlp.down_proj")
    inputs = []

    def block(x):
        hidden = torch.nn.functional.silu(x)  # an activation made inside the checkpointed region
        inputs.append(weakref.ref(hidden))
        return layer(hidden)

    x = torch.randn(2, 5, 768, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    gc.collect()
    assert layer._fused_adapter({}) == "default"
    assert inputs[0]() is None, "the packed LoRA function kept the checkpointed input alive"
    y.sum().backward()  # recomputes the block: the gradient still arrives
    assert layer.lora_A["default"].weight.grad is not None and x.grad is not None


def test_scratch_buffer_is_shared_per_device_and_dtype_and_grows():
    from eora_ft.kernels.scratch import release, scratch

    release()
    small = scratch(4, 8, torch.float32, torch.device("cpu"))
    again = scratch(2, 16, torch.float32, torch.device("cpu"))
    assert small.shape == (4, 8) and again.shape == (2, 16) and again.data_ptr() == small.data_ptr()
    other_dtype = scratch(4, 8, torch.float16, torch.device("cpu"))
    assert other_dtype.data_ptr() != small.data_ptr()
    grown = scratch(64, 64, torch.float32, torch.device("cpu"))
    assert grown.shape == (64, 64) and grown.is_contiguous()
    release()


@pytest.mark.gpu
def test_large_m_path_dequantizes_every_layer_into_one_scratch_buffer_with_exact_gradients():
    from eora_ft.compress import RTN

    g = torch.Generator().manual_seed(4)
    layers = [RTN(bits=4, group_size=128).compress(torch.randn(n, 512, generator=g) * 0.02).to_module(None, torch.bfloat16)
              .cuda() for n in (256, 384)]
    first, second = (layer.transient_weight(torch.bfloat16) for layer in layers)
    assert first.data_ptr() == second.data_ptr()  # one buffer, grown to the larger layer
    assert torch.equal(second, layers[1].dequantize(torch.bfloat16))
    x = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(8, 512, device="cuda") * 0.02).requires_grad_(True)
    b = (torch.randn(384, 8, device="cuda") * 0.02).requires_grad_(True)
    y = packed_lora_linear(x, layers[1].transient_weight, a.bfloat16(), b.bfloat16(), 2.0)
    grads = torch.autograd.grad(y.float().square().sum(), (x, a, b))
    weight = layers[1].dequantize(torch.float32)
    x2, a2, b2 = (t.detach().float().requires_grad_(True) for t in (x, a, b))
    reference = x2 @ weight.t() + 2.0 * (x2 @ a2.bfloat16().float().t()) @ b2.bfloat16().float().t()
    want = torch.autograd.grad(reference.square().sum(), (x2, a2, b2))
    for got, expected in zip(grads, want):
        assert torch.allclose(got.float(), expected, rtol=3e-2, atol=3e-2 * float(expected.abs().max()))


def test_plain_forward_gives_autograd_its_own_weight_and_scratch_only_without_a_gradient(monkeypatch):
    """A compressed linear outside the fused LoRA path (not a LoRA target, or PEFT's forward with dropout)
    must not hand autograd a scratch weight: the next layer's dequantization would overwrite it before
    the backward reads it (on a GPU, where scratch is used)."""
    from eora_ft.compress import RTN
    from eora_ft.compress.linear import CompressedLinear

    layer = RTN(bits=4, group_size=32).compress(torch.randn(8, 64) * 0.02).to_module(None, torch.float32)
    requested = []
    original = CompressedLinear._stored_weight

    def spy(self, dtype=None, transient=False):
        requested.append(transient)
        return original(self, dtype, transient)

    monkeypatch.setattr(CompressedLinear, "_stored_weight", spy)
    x = torch.randn(3, 64)
    layer(x)  # no input gradient: nothing keeps the weight
    layer(x.requires_grad_(True))  # autograd saves the weight for dX
    with torch.no_grad():
        layer(x)
    assert requested == [True, False, True]


@pytest.mark.gpu
def test_chained_compressed_linears_outside_lora_have_exact_input_gradients_on_gpu():
    from eora_ft.compress import RTN

    g = torch.Generator().manual_seed(5)
    layers = [RTN(bits=4, group_size=128).compress(torch.randn(256, 256, generator=g) * 0.05).to_module(None, torch.float32)
              .cuda() for _ in range(2)]
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    (grad,) = torch.autograd.grad(layers[1](layers[0](x)).square().sum(), (x,))
    dense = [layer.dequantize(torch.float32) for layer in layers]
    x2 = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(((x2 @ dense[0].t()) @ dense[1].t()).square().sum(), (x2,))
    assert torch.allclose(grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
