"""eora_alt: 0 alternations is eora; the kept iterate is the best by the calibration objective, with its base."""

import torch

from eora_ft.compress import make_compressor
from eora_ft.compress.stats import ActivationStats
from eora_ft.init import eora_alt_factors, eora_factors


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3.0, 128)  # anisotropic inputs: data matters
    stats = ActivationStats(128)
    stats.add_batch(x)
    return weight, stats


def test_zero_alternations_is_eora_on_the_plain_compression():
    weight, stats = _layer()
    compressor = make_compressor("gptq", bits=2, group_size=32)
    delta = weight - compressor.compress(weight, stats).dequantize()
    alt = eora_alt_factors(weight, delta, compressor, stats, rank=8, iters=0)
    plain = eora_factors(delta, stats, 8)
    assert alt.base is None and torch.equal(alt.a, plain.a) and torch.equal(alt.b, plain.b)


def test_the_best_iterate_is_kept_with_its_base_and_beats_plain_eora_at_2_bits():
    weight, stats = _layer(1)
    compressor = make_compressor("gptq", bits=2, group_size=32)
    delta = weight - compressor.compress(weight, stats).dequantize()
    history = []
    factors = eora_alt_factors(weight, delta, compressor, stats, rank=8, iters=3, history=history)
    assert len(history) == 4
    residual = delta if factors.base is None else weight - factors.base.dequantize()
    error = (residual - factors.delta()).double()
    kept = float((error @ stats.xtx).mul_(error).sum())
    assert abs(kept - min(history)) <= 1e-6 * kept  # B A is an fp32 product
    assert min(history) < history[0] and factors.base is not None  # measured on this seeded layer
