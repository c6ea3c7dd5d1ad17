"""Packing is a bijection on codes for every bit width; the reference dequantizer follows GPTQ semantics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eora_ft.kernels.packing import SUPPORTED_BITS, pack_codes, pack_mask, packed_rows, unpack_codes, unpack_mask
from eora_ft.kernels.reference import dequantize, lora_linear


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), k_words=st.integers(1, 6), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, k_words, n, seed):
    k = 32 * k_words
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(k, bits), n) == (k * bits // 32, n)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_survive_sign_bit(bits):
    codes = torch.full((64, 3), 2**bits - 1)  # all ones: the top word bit set, a negative int32
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 64), codes)


def test_layout_matches_gptq_word_order():
    codes = torch.arange(8).view(8, 1).repeat(4, 1)  # 32 codes of 4 bits: 0..7, 0..7, ...
    packed = pack_codes(codes, 4)
    assert packed.shape == (4, 1)
    assert int(packed[0, 0]) == 0x76543210  # element k sits at bit offset 4 * (k % 8)


@pytest.mark.parametrize("bad", [(1, 32), (5, 32), (4, 48)])
def test_rejects_bad_bits_or_width(bad):
    bits, k = bad
    with pytest.raises(ValueError, match="bits=|multiple of 32"):
        pack_codes(torch.zeros(k, 2, dtype=torch.int64), bits)


def test_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_codes(torch.full((32, 1), 4), 2)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, -1), (8, 32)])
def test_dequantize_is_scale_times_code_minus_zero(bits, group):
    k, n = 128, 5
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    groups = 1 if group == -1 else k // group
    scales = torch.rand(groups, n, generator=g) + 0.1
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    w = dequantize(pack_codes(codes, bits), scales, zeros, bits, group, k)
    for kk in (0, 31, 64, 127):
        gi = 0 if group == -1 else kk // group
        assert torch.allclose(w[:, kk], scales[gi] * (codes[kk] - zeros[gi]))
    # a pruned weight holds its group's zero point: exactly 0, with no mask anywhere
    pruned = torch.rand(k, n, generator=g) > 0.5
    group_of = torch.arange(k) // (k if group == -1 else group)
    at_zero = torch.where(pruned, zeros[group_of], codes)
    sparse = dequantize(pack_codes(at_zero, bits), scales, zeros, bits, group, k)
    assert torch.all(sparse.t()[pruned] == 0) and torch.equal(sparse.t()[~pruned], w.t()[~pruned])


@pytest.mark.parametrize("k", [8, 12, 64, 100])
def test_keep_mask_packs_eight_to_a_byte_and_round_trips(k):
    mask = torch.rand(5, k, generator=torch.Generator().manual_seed(k)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 7) // 8)
    assert torch.equal(unpack_mask(packed, k), mask)
    assert int(packed[0, 0]) == sum(1 << i for i in range(min(8, k)) if mask[0, i])  # least significant bit first


def test_lora_linear_reference():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 7, 16, generator=g), torch.randn(8, 16, generator=g)
    a, b = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    expected = x @ w.t() + 0.5 * (x @ a.t() @ b.t())
    assert torch.allclose(lora_linear(x, w, a, b, 0.5), expected, atol=1e-5)
