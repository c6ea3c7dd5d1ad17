"""GPTQ against round-to-nearest on a toy layer with correlated inputs, and CompressedLinear storage."""

import pytest
import torch

from eora_ft.compress import GPTQ, RTN, ActivationStats, CompressedLinear, make_compressor
from eora_ft.compress.quantizer import QuantSpec


def _toy_layer(seed=0, n=48, k=128, tokens=4096):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.logspace(-1, 1, k)  # strongly unequal input channel energies
    x = (torch.randn(tokens, k, generator=g) @ mixing) * scales
    stats = ActivationStats(k)
    stats.add_batch(x)
    return torch.randn(n, k, generator=g), x, stats


def _output_error(w, w_hat, x):
    return float(torch.linalg.norm((w - w_hat) @ x.t()) / torch.linalg.norm(w @ x.t()))


@pytest.mark.parametrize("bits,group", [(2, 128), (3, -1), (4, 32), (8, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group):
    w, x, stats = _toy_layer()
    rtn = RTN(bits=bits, group_size=group).compress(w, stats).dequantize()
    gptq = GPTQ(bits=bits, group_size=group).compress(w, stats).dequantize()
    assert _output_error(w, gptq, x) < _output_error(w, rtn, x)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_grid_search_never_raises_a_groups_error_and_keeps_valid_grids(bits, sym):
    from eora_ft.compress.quantizer import fake_quantize, grid_params

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) ** 3  # heavy tails: shrinking pays
    plain, searched = QuantSpec(bits, 128, sym), QuantSpec(bits, 128, sym, grid_search=True)

    def error(spec):
        scale, zero = grid_params(w, spec)
        return (fake_quantize(w, scale, zero, spec.maxq) - w).abs().pow(2.4).sum(1), zero

    before, _ = error(plain)
    after, zero = error(searched)
    assert bool((after <= before).all()) and float(after.sum()) < float(before.sum())
    assert torch.equal(zero, zero.round()) and int(zero.min()) >= 0 and int(zero.max()) <= 2**bits - 1
    if sym:
        assert bool((zero == 2 ** (bits - 1)).all())


def test_grid_search_is_one_option_for_every_quantizing_compressor():
    w, x, stats = _toy_layer(2)
    for method in ("rtn", "gptq", "gptq+sparsegpt"):
        plain = make_compressor(method, bits=2).compress(w, stats).dequantize()
        searched = make_compressor(method, bits=2, grid_search=True).compress(w, stats).dequantize()
        assert not torch.equal(plain, searched), method
    make_compressor("sparsegpt", grid_search=True)  # a pruner ignores the option, as it ignores bits
    with pytest.raises(ValueError, match="grid_search"):
        from eora_ft.config import CompressionArguments

        CompressionArguments(compress_method="sparsegpt", grid_search=True)


def test_gptq_codes_and_grids_are_consistent():
    w, _, stats = _toy_layer(1)
    q = GPTQ(bits=3, group_size=32).compress(w, stats)
    assert q.codes.shape == (128, 48) and q.scales.shape == q.zeros.shape == (4, 48)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 7
    assert torch.equal(q.zeros, q.zeros.round())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_linear_round_trips_exactly(method, bits):
    w, x, stats = _toy_layer(2)
    quantized = make_compressor(method, bits=bits, group_size=64).compress(w, stats)
    layer = CompressedLinear.from_quantized(quantized)
    assert torch.equal(layer.dequantize(), quantized.dequantize())
    assert torch.allclose(layer(x[:5]), x[:5] @ quantized.dequantize().t(), atol=1e-4)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.qweight.numel() * 4 == 128 * 48 * bits // 8  # packed bytes are what the bits say


def test_activations_of_another_dtype_set_the_weight_and_bias_dtype():
    """A layer stored in fp32 (load_compressed's default) inside a bf16 model: weight and bias follow x."""
    w, x, stats = _toy_layer(3)
    bias = torch.randn(w.shape[0])
    layer = CompressedLinear.from_quantized(make_compressor("rtn", bits=4, group_size=64).compress(w, stats), bias=bias)
    x16 = x[:5].to(torch.bfloat16)
    y = layer(x16)
    assert y.dtype == torch.bfloat16
    reference = torch.nn.functional.linear(x16, layer.dequantize(torch.bfloat16), bias.to(torch.bfloat16))
    assert torch.equal(y, reference)


def test_dead_input_columns_are_zeroed():
    w, x, _ = _toy_layer(3)
    x[:, 5] = 0
    stats = ActivationStats(128)
    stats.add_batch(x)
    q = GPTQ(bits=4, group_size=-1).compress(w, stats).dequantize()
    assert torch.all(q[:, 5] == 0)  # an input that never fires carries no weight (and no NaN from a singular H)
    assert torch.isfinite(q).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, "bits=5"), ({"bits": 4, "group_size": 100}, "group_size=100"),
])
def test_bad_quant_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_group_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide in_features=96"):
        QuantSpec(bits=4, group_size=64).group(96)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: .*gptq"):
        make_compressor("awq")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])  # 1e30: finite, its square is not
def test_nan_inf_or_overflowing_activations_are_rejected(bad):
    stats = ActivationStats(4)
    x = torch.zeros(3, 4)
    x[1, 2] = bad
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        stats.add_batch(x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_memory_is_what_the_bits_say(bits):
    w, _, stats = _toy_layer(4, n=256, k=512)
    layer = CompressedLinear.from_quantized(RTN(bits=bits, group_size=128).compress(w, stats))
    bf16_bytes = 256 * 512 * 2
    code_bytes = layer.qweight.numel() * layer.qweight.element_size()
    assert code_bytes / bf16_bytes == bits / 16
    grid_bytes = sum(b.numel() * b.element_size() for b in (layer.scales, layer.zeros))
    assert grid_bytes == (512 // 128) * 256 * (4 + 1)  # fp32 scale + uint8 zero per group and row


@pytest.mark.parametrize("column_major", [True, False])
def test_triangular_inverse_is_exact_and_in_place_for_either_layout(column_major):
    """The Hessian chain's L^-1 reuses L's memory (no second K x K fp64 matrix: 1.6 GB at K = 14336) whether
    torch handed L over column-major (its Cholesky does) or row-major."""
    from eora_ft.compress.obs import _inverse_lower

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64)
    lower = torch.linalg.cholesky(a @ a.t() + 40 * torch.eye(40, dtype=torch.float64))
    lower = lower if column_major else lower.contiguous()
    assert lower.is_contiguous() is not column_major
    want = torch.linalg.inv(lower)
    address = lower.data_ptr()
    got = _inverse_lower(lower)
    assert got.data_ptr() == address and torch.allclose(got, want, atol=1e-14, rtol=0)
