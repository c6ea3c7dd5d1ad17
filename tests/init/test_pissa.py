"""PiSSA as QPiSSA: the adapter is the weight's principal part (PEFT's split), the base the compressed rest."""

import pytest
import torch

from eora_ft.compress import GPTQ, RTN
from eora_ft.compress.stats import ActivationStats
from eora_ft.init import get_initializer, pissa_factors


def _spiked_weight(seed: int, n: int = 32, k: int = 128, spike: float = 4.0) -> torch.Tensor:
    """A weight whose range is set by a few large singular directions, as in LLM linears (PiSSA's premise)."""
    g = torch.Generator().manual_seed(seed)
    principal = torch.randn(n, 2, generator=g) @ torch.randn(2, k, generator=g)
    return spike * principal + 0.1 * torch.randn(n, k, generator=g)


def test_the_adapter_is_the_principal_part_split_as_peft_splits_it():
    weight = _spiked_weight(0)
    factors = pissa_factors(weight, RTN(bits=4, group_size=32), None, 4)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(factors.delta().double(), best, rtol=0, atol=1e-4)  # fp32 factors of a ~10 weight
    # B = U_r S_r^1/2 and A = S_r^1/2 V_r^T: B^T B = A A^T = S_r
    torch.testing.assert_close(factors.b.t() @ factors.b, factors.a @ factors.a.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.diagonal(factors.a @ factors.a.t()).double(), s[:4], rtol=1e-4, atol=0)


def test_the_base_is_the_compressed_residual():
    weight = _spiked_weight(1)
    compressor = RTN(bits=3, group_size=32)
    factors = pissa_factors(weight, compressor, None, 4)
    residual = weight - factors.delta()
    assert torch.equal(factors.base.codes, compressor.compress(residual).codes)
    # W = Q + B A up to the residual's own compression error (the two sides round differently in fp32: a few ulps
    # of the largest weight)
    atol = 4 * torch.finfo(torch.float32).eps * float(weight.abs().max())
    torch.testing.assert_close(weight - factors.base.dequantize() - factors.delta(),
                               residual - compressor.compress(residual).dequantize(), rtol=0, atol=atol)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_taking_out_the_principal_part_lowers_the_weight_error_below_plain_compression(bits):
    """QPiSSA's claim on a spiked weight: ||W - Q(W - BA) - BA|| < ||W - Q(W)||, QLoRA's starting error."""
    weight = _spiked_weight(2)
    compressor = RTN(bits=bits, group_size=32)
    factors = pissa_factors(weight, compressor, None, 4)
    pissa_error = torch.linalg.norm(weight - factors.base.dequantize() - factors.delta())
    plain_error = torch.linalg.norm(weight - compressor.compress(weight).dequantize())
    assert pissa_error < 0.5 * plain_error


def test_a_data_aware_compressor_gets_the_layers_statistics():
    weight = _spiked_weight(3, n=16, k=64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 64, dtype=torch.float64)
    stats = ActivationStats(64)
    stats.add_batch(x)
    gptq = GPTQ(bits=2, group_size=32)
    factors = get_initializer("pissa")(weight - weight, stats, 4, weight=weight, compressor=gptq)
    residual = weight - factors.delta()
    assert torch.equal(factors.base.codes, gptq.compress(residual, stats).codes)
    with pytest.raises(ValueError, match="weight= and compressor="):
        get_initializer("pissa")(weight, stats, 4)
