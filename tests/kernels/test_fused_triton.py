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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m,k,n,group,rank", [(1, 128, 64, 32, 8), (5, 96, 72, -1, 4), (17, 160, 40, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_grad_input_match_reference(bits, m, k, n, group, rank, dtype):
    from eora_ft.kernels.fused import fused_forward, fused_grad_input

    qweight, scales, zeros, a, b = _layer(bits, k, n, group, rank, dtype, seed=bits + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    weight = dequantize(qweight, scales, zeros, bits, group, k, dtype=torch.float32)
    want = lora_linear(x.float(), weight, a.float(), b.float(), 0.5, bias.float())
    got = fused_forward(x, qweight, scales, zeros, bits, group, a, b, 0.5, bias)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and torch.allclose(got.float(), want, atol=tol, rtol=tol)

    grad_y = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
    want_dx = grad_y.float() @ weight + 0.5 * (grad_y.float() @ b.float()) @ a.float()
    got_dx = fused_grad_input(grad_y, qweight, scales, zeros, bits, group, k, a, b, 0.5)
    assert got_dx.shape == (m, k) and torch.allclose(got_dx.float(), want_dx, atol=tol, rtol=tol)


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
