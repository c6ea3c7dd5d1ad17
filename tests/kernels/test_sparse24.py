"""The 2:4 rebuild of pruned-only layers (torch passes and the Triton kernel) equals masked_scatter_ bit for bit."""

import os

import pytest
import torch

from eora_ft.kernels.packing import pack_mask
from eora_ft.kernels.sparse24 import is_two_four, masked_dense, two_four_dense, two_four_dense_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def _two_four(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    mask.scatter_(2, torch.rand(n, k // 4, 4, generator=g).topk(2, dim=2).indices, True)
    mask = mask.view(n, k)
    weight = torch.randn(n, k, generator=g)
    weight[0, :8] = torch.tensor([-0.0, 0.0, -1.5, 2.0, -0.0, 3.0, 0.0, -0.0])  # signed zeros must survive
    mask[0, :8] = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1]).bool()
    return weight[mask].to(dtype).to(DEVICE), pack_mask(mask).to(DEVICE), mask


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(8, 16), (24, 64), (5, 200)])
def test_torch_passes_equal_masked_scatter_bit_for_bit(dtype, n, k):
    values, keep_bits, _ = _two_four(n, k, seed=n + k)
    assert is_two_four(keep_bits, k, values.numel())
    want = masked_dense(values, keep_bits, n, k, dtype)
    got = two_four_dense_torch(values, keep_bits, n, k, dtype)
    assert got.shape == (n, k) and got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(two_four_dense(values, keep_bits, n, k, dtype)), _bits(want))


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter mishandles bf16
@pytest.mark.parametrize("n,k", [(8, 16), (37, 96)])  # 37 x 96 / 4 groups: not a multiple of the block
def test_triton_kernel_equals_masked_scatter_bit_for_bit(dtype, n, k):
    from eora_ft.kernels.sparse24_triton import two_four_dense_triton

    values, keep_bits, _ = _two_four(n, k, seed=n)
    want = masked_dense(values, keep_bits, n, k, dtype)
    assert torch.equal(_bits(two_four_dense_triton(values, keep_bits, n, k, dtype)), _bits(want))
    with pytest.raises(ValueError, match=f"needs {n * k // 2} values"):
        two_four_dense_triton(values[:-2], keep_bits, n, k, dtype)


def test_other_patterns_are_not_taken_for_two_four():
    values, keep_bits, mask = _two_four(8, 16)
    assert not is_two_four(keep_bits, 16, values.numel() - 1)  # count mismatch
    four_eight = mask.clone()
    four_eight[1, :8] = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0]).bool()  # 4:8, not 2:4
    assert not is_two_four(pack_mask(four_eight), 16, int(four_eight.sum()))
    assert not is_two_four(pack_mask(mask[:, :12]), 12, int(mask[:, :12].sum()))  # K not whole bytes
