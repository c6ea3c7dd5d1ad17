"""Small-M fused kernels (dequantize in the K loop + LoRA slab) against the pure-torch reference."""

import os

import pytest
import torch

from eora_ft.kernels.packing import pack_codes
from eora_ft.kernels.reference import dequantize, lora_linear

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1 set before import")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def _layer(bits, k, n, group, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    groups = 1 if group == -1 else k // group
    scales = (torch.rand(groups, n, generator=g) * 0.05 + 0.01)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).to(torch.uint8)
    a = torch.randn(rank, k, generator=g) * 0.1
    b = torch.randn(n, rank, generator=g) * 0.1
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(pack_codes(codes, bits)), to(scales.to(dtype)), to(zeros), to(a.to(dtype)), to(b.to(dtype))


# What the kernels compute, written with torch: operands rounded to the activations' dtype (the weight
# once, from fp32, as dequantize(dtype=...) does; the LoRA slab's left operand after scaling), products
# summed in fp32. The kernels differ from it only by fp32 summation order and the final rounding to dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11}


def _forward_spec(x, weight, a, b, scaling, bias, dtype):
    u = (scaling * (x.float() @ a.float().t())).to(dtype).float()
    y = x.float() @ weight.to(dtype).float().t() + u @ b.to(dtype).float().t()
    return y + bias.float() if bias is not None else y


def _grad_input_spec(grad_y, weight, a, b, scaling, dtype):
    g = (scaling * (grad_y.float() @ b.float())).to(dtype).float()
    return grad_y.float() @ weight.to(dtype).float() + g @ a.to(dtype).float()


def _tolerance(reference, operand_magnitude, dtype):
    """Output rounding to ``dtype`` plus fp32 summation of the K (or N) products."""
    return UNIT_ROUNDOFF[dtype] * reference.abs() + 2.0**-20 * operand_magnitude


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
# group 64: every K tile inside one group (one row of scales per tile); 32 and ragged per-channel: gathered
@pytest.mark.parametrize("m,k,n,group,rank,split", [(1, 128, 64, 32, 8, 1), (5, 96, 72, -1, 4, 2), (17, 160, 40, 32, 16, 3),
                                                    (2, 192, 64, 64, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_grad_input_match_what_they_should_compute(bits, m, k, n, group, rank, split, dtype):
    from eora_ft.kernels.fused import fused_forward, fused_grad_input

    qweight, scales, zeros, a, b = _layer(bits, k, n, group, rank, dtype, seed=bits + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    weight = dequantize(qweight, scales, zeros, bits, group, k, dtype=torch.float32)
    want = _forward_spec(x, weight, a, b, 0.5, bias, dtype)
    got = fused_forward(x, qweight, scales, zeros, bits, group, a, b, 0.5, bias, split=split)
    magnitude = x.float().abs() @ weight.abs().t() + 1.0
    assert got.dtype == dtype and torch.all((got.float() - want).abs() <= _tolerance(want, magnitude, dtype))

    grad_y = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
    want_dx = _grad_input_spec(grad_y, weight, a, b, 0.5, dtype)
    got_dx = fused_grad_input(grad_y, qweight, scales, zeros, bits, group, k, a, b, 0.5, split=split)
    magnitude = grad_y.float().abs() @ weight.abs() + 1.0
    assert got_dx.shape == (m, k) and torch.all((got_dx.float() - want_dx).abs() <= _tolerance(want_dx, magnitude, dtype))


def test_fp16_dots_round_the_weight_to_fp16_and_fp32_dots_do_not():
    """The weight tile enters the dot in the activations' dtype: fp16 results follow the fp16-rounded
    weight, fp32 results the exact one (IEEE fp32, no TF32 rounding)."""
    from eora_ft.kernels.fused import fused_forward

    qweight, scales, zeros, a, b = _layer(8, 128, 64, 32, 4, torch.float32, seed=11)
    scales = scales * (1 + 2.0**-14)  # weights that fp16 cannot hold exactly
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    weight = dequantize(qweight, scales, zeros, 8, 32, 128, dtype=torch.float32)
    exact = fused_forward(x, qweight, scales, zeros, 8, 32, a, b * 0, 1.0)
    reference = x.double() @ weight.double().t()
    # fp32 summation only; TF32 (10-bit mantissas) would be off by ~2^-11 of the magnitude, 500x this bound
    assert torch.all((exact.double() - reference).abs() <= _tolerance(reference, x.abs() @ weight.abs().t(), torch.float32))
    half = fused_forward(x.half(), qweight, scales.half(), zeros, 8, 32, a.half(), b.half() * 0, 1.0).float()
    weight_half = dequantize(qweight, scales.half(), zeros, 8, 32, 128, dtype=torch.float16).float()
    rounded = x.half().float() @ weight_half.t()
    assert torch.all((half - rounded).abs() <= _tolerance(rounded, x.abs() @ weight.abs().t(), torch.float16))
    assert not torch.all((half - exact).abs() <= _tolerance(exact, x.abs() @ weight.abs().t(), torch.float16))


def test_autograd_function_small_m_path_matches_the_reference_path():
    from eora_ft.kernels.lora_matmul import Packed, packed_lora_linear

    qweight, scales, zeros, a, b = _layer(4, 128, 64, 32, 8, torch.float32, seed=3)
    packed = Packed(qweight, scales, zeros, 4, 32, 128)
    weight_fn = lambda dtype: dequantize(qweight, scales, zeros, 4, 32, 128, dtype=dtype)  # noqa: E731
    x = torch.randn(1, 3, 128, device=DEVICE, requires_grad=True)
    results = []
    for force in (True, False):
        a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = packed_lora_linear(x, weight_fn, a_, b_, 2.0, None, packed, force_fused=force)
        grads = torch.autograd.grad(y.square().sum(), (x, a_, b_))
        results.append((y, *grads))
    for fused, reference in zip(*results):
        assert torch.allclose(fused, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compiled_bf16_fused_kernels(bits):
    from eora_ft.kernels.fused import fused_forward, fused_grad_input

    qweight, scales, zeros, a, b = _layer(bits, 4096, 1024, 128, 16, torch.bfloat16, seed=bits)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    weight = dequantize(qweight, scales, zeros, bits, 128, 4096, dtype=torch.float32)
    want = lora_linear(x.float(), weight, a.float(), b.float(), 1.0)
    got = fused_forward(x, qweight, scales, zeros, bits, 128, a, b, 1.0)
    assert torch.allclose(got.float(), want, atol=5e-2, rtol=5e-2)
    grad_y = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    want_dx = grad_y.float() @ weight + (grad_y.float() @ b.float()) @ a.float()
    assert torch.allclose(fused_grad_input(grad_y, qweight, scales, zeros, bits, 128, 4096, a, b, 1.0).float(), want_dx,
                          atol=5e-2, rtol=5e-2)


# rank_allocation: budget picks any rank up to rank_max_factor * lora_r (e.g. 512): the LoRA slab loops over
# the rank in chunks of the tile width, so ranks above one chunk (64 in the fp32 configs' 32-wide tiles: 3
# and 7 chunks) and not a power of two must give the same results as a small one
@pytest.mark.parametrize("rank", [80, 200])
def test_ranks_wider_than_one_chunk(rank):
    from eora_ft.kernels.fused import fused_forward, fused_grad_input

    dtype = torch.float32
    qweight, scales, zeros, a, b = _layer(4, 128, 64, 32, rank, dtype, seed=rank)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(3, 128, generator=gen).to(DEVICE)
    weight = dequantize(qweight, scales, zeros, 4, 32, 128, dtype=torch.float32)
    want = _forward_spec(x, weight, a, b, 0.5, None, dtype)
    got = fused_forward(x, qweight, scales, zeros, 4, 32, a, b, 0.5, split=1)
    magnitude = x.abs() @ weight.abs().t() + (x.abs() @ a.abs().t()) @ b.abs().t() + 1.0
    assert torch.all((got - want).abs() <= _tolerance(want, magnitude, dtype))
    lora_only = fused_forward(x, qweight, scales, zeros, 4, 32, a, b, 0.5, split=1) - fused_forward(
        x, qweight, scales, zeros, 4, 32, a, b * 0, 0.5, split=1)
    assert torch.allclose(lora_only, 0.5 * (x @ a.t()) @ b.t(), atol=1e-4)  # every chunk of the rank counted

    grad_y = torch.randn(3, 64, generator=gen).to(DEVICE)
    want_dx = _grad_input_spec(grad_y, weight, a, b, 0.5, dtype)
    got_dx = fused_grad_input(grad_y, qweight, scales, zeros, 4, 32, 128, a, b, 0.5, split=1)
    magnitude = grad_y.abs() @ weight.abs() + (grad_y.abs() @ b.abs()) @ a.abs() + 1.0
    assert torch.all((got_dx - want_dx).abs() <= _tolerance(want_dx, magnitude, dtype))
