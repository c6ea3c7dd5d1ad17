"""Compressors for a merge: a weight already on the base's grid comes back unchanged, masks are kept, and GPTQ's
error feedback places a correction better than rounding does."""

import pytest
import torch

from eora_ft.compress import GPTQ, ActivationStats, CompressedLinear, SparseGPT
from eora_ft.compress.obs import obs_sweep
from eora_ft.compress.quantizer import QuantSpec
from eora_ft.compress.recompress import KeepMask, OnGrid, SameGrid, grid_symmetric, keep_mask, recompressor_for


def _layer_data(seed=0, n=64, k=256, tokens=1024):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5
    x = (torch.randn(tokens, k, generator=g) @ mixing) * torch.logspace(-1, 1, k)  # unequal, correlated inputs
    stats = ActivationStats(k)
    stats.add_batch(x)
    return torch.randn(n, k, generator=g), x, stats


def _error(w, w_hat, x):
    return torch.linalg.norm((w - w_hat) @ x.t()).item()


def _compressed(compressor, w, stats) -> CompressedLinear:
    return compressor.compress(w, stats).to_module(None, torch.float32)


@pytest.mark.parametrize("sym", [False, True])
def test_a_weight_on_the_grid_comes_back_with_the_same_codes(sym):
    w, _, stats = _layer_data()
    base = _compressed(GPTQ(bits=3, group_size=64, sym=sym), w, stats)
    target = base.dequantize(torch.float32)
    for how in ("recompress", "round"):
        again = _compressed(recompressor_for(base, target, how, {"method": "gptq"}), target, stats)
        assert torch.equal(again.qweight, base.qweight) and torch.equal(again.zeros, base.zeros), how
        assert torch.equal(again.scales, base.scales), how


def test_round_keeps_an_act_order_layers_own_groups():
    w, _, _ = _layer_data(1, n=32, k=128)
    g = torch.Generator().manual_seed(1)
    g_idx = torch.randperm(128, generator=g) % 2  # two groups of 64, interleaved: the layer keeps a perm
    codes = torch.randint(0, 16, (128, 32), generator=g)
    base = CompressedLinear.from_codes(codes, torch.rand(2, 32, generator=g) + 0.1, torch.full((2, 32), 8.0), 4, 64,
                                       g_idx=g_idx)
    target = base.dequantize(torch.float32)
    again = SameGrid(base, None).compress(target).to_module(None, torch.float32)
    assert torch.equal(again.dequantize(torch.float32), target)


def test_a_fixed_mask_is_kept_and_its_weights_re_solved():
    w, x, stats = _layer_data(2)
    pruned = _compressed(SparseGPT(sparsity="2:4"), w, stats)  # pruned only: the mask is stored
    mask = keep_mask(pruned, w, None)
    target = pruned.dequantize(torch.float32) + 0.05 * torch.randn_like(w)
    solved = _compressed(KeepMask(mask, None), target, stats).dequantize(torch.float32)
    assert bool(((solved != 0) <= mask).all())  # nothing outside the mask
    assert _error(target, solved, x) < _error(target, target * mask, x)  # re-solved beats masking alone


def test_a_quantized_2_4_mask_is_read_from_its_zeros_and_completed():
    w, _, stats = _layer_data(3)
    base = _compressed(SparseGPT(sparsity="2:4", bits=2, group_size=64), w, stats)
    nonzero = base.dequantize(torch.float32) != 0
    mask = keep_mask(base, w, "2:4")
    assert bool((nonzero <= mask).all())  # every kept weight stays kept
    assert bool((mask.reshape(64, -1, 4).sum(-1) == 2).all())  # and the pattern stays exactly 2:4
    assert bool((~nonzero.reshape(64, -1, 4)).sum(-1).gt(2).any())  # the test needs groups with a kept zero


def test_on_grid_places_a_correction_better_than_rounding():
    w, x, stats = _layer_data(4)
    base = _compressed(GPTQ(bits=4, group_size=128), w, stats)
    g = torch.Generator().manual_seed(4)
    correction = 0.3 * (torch.randn(64, 8, generator=g) @ torch.randn(8, 256, generator=g)) / 8  # low rank, sub-step
    target = base.dequantize(torch.float32) + correction
    on_grid = _compressed(recompressor_for(base, target, "recompress", {}), target, stats).dequantize(torch.float32)
    rounded = _compressed(recompressor_for(base, target, "round", {}), target, stats).dequantize(torch.float32)
    assert _error(target, on_grid, x) < 0.9 * _error(target, rounded, x)
    assert _error(target, on_grid, x) < _error(target, base.dequantize(torch.float32), x)  # the correction lands


def test_each_base_gets_the_compressor_that_keeps_its_storage():
    w, _, stats = _layer_data(5, n=32, k=128)
    dense = _compressed(GPTQ(bits=4, group_size=64, sym=True), w, stats)
    assert grid_symmetric(dense)
    assert isinstance(recompressor_for(dense, w, "recompress", {}), OnGrid)
    regrid = recompressor_for(dense, w, "regrid", {"method": "gptq", "options": {"damp_percent": 0.05}})
    assert isinstance(regrid, GPTQ) and regrid.spec.sym and regrid.damp_percent == 0.05
    assert isinstance(recompressor_for(dense, w, "round", {}), SameGrid)
    pruned = _compressed(SparseGPT(sparsity="2:4"), w, stats)
    assert isinstance(recompressor_for(pruned, w, "recompress", {}), KeepMask)
    with pytest.raises(ValueError, match="merge method 'smooth' is not valid"):
        recompressor_for(dense, w, "smooth", {})


def test_sweep_arguments_are_checked():
    w, _, stats = _layer_data(6, n=8, k=64)
    with pytest.raises(ValueError, match="does not match the weight"):
        obs_sweep(w, stats.covariance(), fixed_mask=torch.ones(8, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="fixed_grid scales"):
        obs_sweep(w, stats.covariance(), quant=QuantSpec(bits=4, group_size=32),
                  fixed_grid=(torch.ones(1, 8), torch.zeros(1, 8)))
