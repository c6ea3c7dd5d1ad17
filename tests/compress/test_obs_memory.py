"""The Hessian chain of GPTQ / SparseGPT (permutation, Cholesky, triangular inverse) runs in the Hessian's own
memory: with the layer's statistics, two K x K fp64 matrices at most (issue #34 item 9: up to four, 26 GB, at
K = 28672), and the same upper factor as the textbook route."""

import pytest
import scipy.linalg.lapack
import torch

from eora_ft.compress import GPTQ, SparseGPT, Wanda
from eora_ft.compress import obs
from eora_ft.compress.stats import ActivationStats
from tests._allocations import peak_bytes

K = 2048
BLOCK = 128  # obs' blocks scaled down with K (512 at K = 28672): its [K, block] temporaries stay small beside K x K


def _stats(k: int, tokens: int = 4096, seed: int = 0) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5  # correlated inputs, as a layer's are
    x = torch.randn(tokens, k, generator=g) @ mixing + 0.1 * torch.randn(tokens, k, generator=g)
    stats = ActivationStats(k)
    stats.add_batch(x)
    return stats


@pytest.fixture(scope="module")
def stats_k() -> ActivationStats:
    return _stats(K)


@pytest.mark.parametrize("compressor", [GPTQ(bits=4, act_order=True), GPTQ(bits=3, act_order=False),
                                        SparseGPT(sparsity="2:4")], ids=["gptq-act-order", "gptq", "sparsegpt"])
@pytest.mark.parametrize("inverse", ["lapack", "blocked"])
def test_at_most_one_kxk_fp64_besides_the_statistics(stats_k, compressor, inverse, monkeypatch):
    """The statistics' X^T X plus one working copy: the compressor allocates at most one K x K fp64 matrix (and
    [K, block] blocks) on top of what is alive. The former chain (index_select twice, Cholesky into a new matrix, a
    triangular solve against an identity) allocated two or more; the device path (blocked) is checked here too."""
    monkeypatch.setattr(obs, "PERMUTE_BLOCK", BLOCK)
    monkeypatch.setattr(obs, "TRIANGULAR_BLOCK", BLOCK)
    if inverse == "blocked":
        monkeypatch.setattr(obs, "_inverse_lower", obs._inverse_lower_blocked_)
    weight = torch.randn(32, K, generator=torch.Generator().manual_seed(1))
    with peak_bytes() as peak:
        compressor.compress(weight, stats_k)
    kxk = K * K * 8
    assert peak["bytes"] < 1.25 * kxk, f"{peak['bytes'] / kxk:.2f} K x K fp64 matrices allocated at once"


def test_wanda_reads_the_diagonal_without_a_kxk_copy(stats_k):
    weight = torch.randn(32, K, generator=torch.Generator().manual_seed(2))
    with peak_bytes() as peak:
        pruned = Wanda("2:4").compress(weight, stats_k)
    assert peak["bytes"] < 0.1 * K * K * 8
    metric = weight.abs() * torch.diag(stats_k.covariance()).sqrt().float()  # the textbook formula
    keep = metric.view(32, -1, 4).topk(2, dim=-1).indices
    want = torch.zeros(32, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(32, K)
    assert torch.equal(pruned.mask, want)


def test_second_moments_equal_the_covariance_diagonal_bit_for_bit(stats_k):
    assert torch.equal(stats_k.second_moments(), torch.diag(stats_k.covariance()))


@pytest.mark.parametrize("k, block", [(300, 64), (256, 128), (129, 512)])
def test_blocked_triangular_inverse_matches_lapack_in_place(k, block):
    """The device path of L^-1 (no trtri in torch) against LAPACK trtri, in L's own memory, sizes that are and
    are not multiples of the block."""
    g = torch.Generator().manual_seed(k)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    lower = torch.linalg.cholesky(a @ a.t() + k * torch.eye(k, dtype=torch.float64))
    want, info = scipy.linalg.lapack.dtrtri(lower.numpy(), lower=1)
    assert info == 0
    address = lower.data_ptr()
    got = obs._inverse_lower_blocked_(lower, block=block)
    assert got.data_ptr() == address
    assert torch.equal(got.triu(1), torch.zeros_like(got))  # still lower triangular
    assert torch.allclose(got, torch.from_numpy(want), rtol=0, atol=1e-13 * float(torch.from_numpy(want).abs().max()))


@pytest.mark.parametrize("act_order", [False, True])
def test_upper_factor_is_the_cholesky_factor_of_the_permuted_inverse(act_order):
    """J L^-1 J read block by block equals the upper Cholesky factor of (P^T H P)^-1, the GPTQ reference's
    Cholesky -> inverse -> Cholesky, to fp64 round-off."""
    k = 200
    h = _stats(k, tokens=800, seed=3).covariance()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    permuted = h[order][:, order]
    want = torch.linalg.cholesky(torch.linalg.inv(permuted), upper=True)
    lower_inverse = obs._upper_inverse_factor(h.clone(), order.flip(0), damp_percent=0.01)
    got = torch.zeros(k, k)
    for start in range(0, k, 64):  # what the sweep reads: its rows from the diagonal on, one block at a time
        stop = min(start + 64, k)
        got[start:stop, start:] = obs._inverse_rows(lower_inverse, start, stop)
    assert torch.allclose(got, want.float(), rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_only_the_lower_triangle_of_the_permuted_hessian_is_read():
    """LAPACK factors the column-major view of the row-major Hessian: the lower triangle is mirrored first, so the
    factor depends on the values a row-major Cholesky of ``P^T H P`` reads (X^T X need not be exactly symmetric
    in round-off), as it did before the chain went in place."""
    k = 96
    h = _stats(k, tokens=400, seed=4).covariance()
    h.diagonal().add_(1e-3)
    order = torch.arange(k)  # P = I: the permuted lower triangle is h's own
    plain = obs._upper_inverse_factor(h.clone(), order, 0.01).clone()
    upper_off = h.triu(1) * (1 + 1e-9) + h.tril()  # round-off-sized changes to the upper triangle only
    lower_off = h.tril(-1) * (1 + 1e-9) + h.triu()
    assert torch.equal(obs._upper_inverse_factor(upper_off, order, 0.01), plain)
    assert not torch.equal(obs._upper_inverse_factor(lower_off, order, 0.01), plain)


@pytest.mark.gpu
def test_on_a_gpu_the_chain_allocates_one_kxk_and_agrees_with_the_cpu():
    """On CUDA: the blocked triangular inverse and cuSOLVER's in-place Cholesky (measured by the caching
    allocator's peak) and the same upper factor as the CPU's LAPACK route."""
    k = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    stats = ActivationStats(k, device="cuda")
    stats.add_batch(torch.randn(2 * k, k, generator=g, device="cuda") * torch.rand(k, generator=g, device="cuda"))
    weight = torch.randn(1024, k, generator=g, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    GPTQ(bits=4).compress(weight, stats)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1.25 * k * k * 8
    small = _stats(1024, seed=5).covariance()
    small.diagonal().add_(0.01 * small.diagonal().mean())
    order = torch.arange(1023, -1, -1)
    on_cpu = obs._upper_inverse_factor(small.clone(), order, 0.01)
    on_gpu = obs._upper_inverse_factor(small.cuda(), order.cuda(), 0.01).cpu()
    assert torch.allclose(on_gpu, on_cpu, rtol=0, atol=1e-10 * float(on_cpu.abs().max()))
