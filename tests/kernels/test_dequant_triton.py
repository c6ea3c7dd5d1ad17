"""The Triton dequantization kernel against the pure-torch reference (interpreter on CPU, compiled on GPU)."""

import os

import pytest
import torch

from eora_ft.kernels.packing import pack_codes
from eora_ft.kernels.reference import dequantize

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1 set before import")


def _packed(bits, k, n, group, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    groups = 1 if group == -1 else k // group
    scales = torch.rand(groups, n, generator=g) + 0.05
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).to(torch.uint8)
    return pack_codes(codes, bits).to(device), scales.to(device), zeros.to(device)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,group", [(128, 64, 32), (96, 72, -1), (160, 40, 32)])  # ragged N/K vs 64 blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(bits, k, n, group, dtype):
    from eora_ft.kernels.dequant import dequantize_triton

    device = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
    qweight, scales, zeros = _packed(bits, k, n, group, seed=bits, device=device)
    got = dequantize_triton(qweight, scales, zeros, bits, group, k, dtype=dtype)
    want = dequantize(qweight, scales, zeros, bits, group, k, dtype=dtype)
    assert got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [3, 4])
def test_a_tile_across_groups_gathers_its_scales(bits):
    from eora_ft.kernels.dequant import dequantize_triton

    qweight, scales, zeros = _packed(bits, 128, 64, 32, seed=5)
    got = dequantize_triton(qweight, scales, zeros, bits, 32, 128, dtype=torch.float32, block_k=64)  # 2 groups a tile
    assert torch.equal(got, dequantize(qweight, scales, zeros, bits, 32, 128))


def test_writes_into_a_reused_buffer_and_rejects_a_wrong_one():
    from eora_ft.kernels.dequant import dequantize_triton

    qweight, scales, zeros = _packed(4, 64, 32, 32)
    scratch = torch.full((32, 64), float("nan"))
    out = dequantize_triton(qweight, scales, zeros, 4, 32, 64, out=scratch)
    assert out.data_ptr() == scratch.data_ptr() and torch.isfinite(scratch).all()
    with pytest.raises(ValueError, match=r"contiguous \[32, 64\] buffer"):
        dequantize_triton(qweight, scales, zeros, 4, 32, 64, out=torch.empty(64, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bf16_on_gpu(bits):
    from eora_ft.kernels.dequant import dequantize_triton

    qweight, scales, zeros = _packed(bits, 4096, 1024, 128, device="cuda")
    got = dequantize_triton(qweight, scales, zeros, bits, 128, 4096, dtype=torch.bfloat16)
    want = dequantize(qweight, scales, zeros, bits, 128, 4096, dtype=torch.bfloat16)
    assert torch.equal(got, want)
