"""EoRA is the optimum of min ||(dW - BA) X^T||_F; the baselines order as the theory says."""

import pytest
import torch

from eora_ft.compress import ActivationStats
from eora_ft.init import INITIALIZERS, check_rank, eora_factors, get_initializer, qlora_factors, svd_factors


def _problem(seed=0, n=12, k=20, tokens=400, rank_deficient=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    x = x * torch.logspace(-1, 1, k, dtype=torch.float64)
    if rank_deficient:
        x[:, k // 2:] = x[:, : k - k // 2] @ torch.randn(k - k // 2, k // 2, generator=g, dtype=torch.float64)
    stats = ActivationStats(k)
    stats.add_batch(x)
    return torch.randn(n, k, generator=g, dtype=torch.float64), x, stats


def _weighted_error(delta, approx, x):
    return float(torch.linalg.norm((delta - approx) @ x.t()))


def _cholesky_optimum(delta, cov, rank):
    """SVD-LLM / QERA-exact route: whiten with the Cholesky factor, truncate, unwhiten."""
    chol = torch.linalg.cholesky(cov)
    u, s, vh = torch.linalg.svd(delta @ chol, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(chol)


def _alternating_least_squares(delta, x, rank, starts=3, iters=200):
    """Brute force: ALS on ||(dW - B A) X^T|| from several random starts, best objective kept."""
    best = None
    for seed in range(starts):
        b = torch.randn(delta.shape[0], rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for _ in range(iters):
            a = torch.linalg.pinv(b) @ delta  # exact minimiser over A for fixed B (X has full column rank)
            b = torch.linalg.lstsq((a @ x.t()).t(), (delta @ x.t()).t()).solution.t()
        err = _weighted_error(delta, b @ a, x)
        best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_eora_equals_brute_force_and_cholesky_optimum(rank):
    delta, x, stats = _problem()
    eora = eora_factors(delta, stats, rank).delta().double()
    cholesky = _cholesky_optimum(delta, stats.covariance(), rank)
    assert torch.allclose(eora, cholesky, atol=1e-4, rtol=1e-4)  # fp32 factors: round-off of fp32
    optimum = _alternating_least_squares(delta, x, rank)
    assert _weighted_error(delta, eora, x) == pytest.approx(optimum, rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_ordering_eora_svd_none(seed):
    delta, x, stats = _problem(seed)
    errs = {name: _weighted_error(delta, get_initializer(name)(delta, stats, 4).delta().double(), x)
            for name in ("eora", "act_diag", "svd", "qlora")}
    none = _weighted_error(delta, torch.zeros_like(delta), x)
    assert errs["eora"] <= errs["svd"] <= none
    assert errs["eora"] <= errs["act_diag"] <= none
    assert errs["qlora"] == pytest.approx(none)  # B = 0: outputs unchanged


def test_clamp_and_damp_modes_match_inverse_free_on_full_rank_covariance():
    delta, x, stats = _problem(1)
    base = eora_factors(delta, stats, 5).delta()
    assert torch.allclose(eora_factors(delta, stats, 5, eigen_mode="clamp").delta(), base, atol=1e-4)
    damped = eora_factors(delta, stats, 5, eigen_mode="damp", damp=1e-6).delta()
    assert torch.allclose(damped, base, atol=1e-3)


def test_rank_deficient_covariance_gives_finite_factors():
    delta, x, stats = _problem(2, rank_deficient=True)
    for mode in ("inverse_free", "clamp", "damp"):
        f = eora_factors(delta, stats, 8, eigen_mode=mode)
        assert torch.isfinite(f.a).all() and torch.isfinite(f.b).all()
    f = eora_factors(delta, stats, 8)
    assert _weighted_error(delta, f.delta().double(), x) <= _weighted_error(delta, torch.zeros_like(delta), x)


def test_effective_rank_reported_when_singular_values_vanish():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(10, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g, dtype=torch.float64)
    stats = ActivationStats(16)
    stats.add_batch(torch.randn(100, 16, generator=g))
    f = eora_factors(delta, stats, 5)
    assert f.effective_rank == 2 and f.rank == 5
    assert torch.all(f.a[2:] == 0) and torch.all(f.b[:, 2:] == 0)
    assert torch.allclose(f.delta().double(), delta, atol=1e-4)
    assert svd_factors(delta, 5).effective_rank == 2


def test_act_diag_is_optimal_for_the_diagonal_weighting():
    delta, x, stats = _problem(5)
    d = torch.diag(torch.diag(stats.covariance()).sqrt())
    u, s, vh = torch.linalg.svd(delta @ d, full_matrices=False)
    best = float(torch.linalg.norm(delta @ d - (u[:, :4] * s[:4]) @ vh[:4]))
    got = get_initializer("act_diag")(delta, stats, 4).delta().double()
    assert float(torch.linalg.norm((delta - got) @ d)) == pytest.approx(best, rel=1e-5)


def test_shrink_one_is_svd():
    delta, x, stats = _problem(3)
    assert torch.allclose(eora_factors(delta, stats, 4, shrink=1.0).delta(), svd_factors(delta, 4).delta(), atol=1e-4)


def test_qlora_is_peft_default_shape_and_zero_b():
    f = qlora_factors(torch.zeros(6, 10), 3, generator=torch.Generator().manual_seed(0))
    assert f.a.shape == (3, 10) and f.b.shape == (6, 3) and torch.all(f.b == 0) and f.a.abs().max() > 0
    assert f.effective_rank == 3  # every direction trains: trim_rank must not cut it
    assert f.scaled_for_peft(4.0).a is f.a  # B = 0: A stays Kaiming whatever lora_alpha is


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown init method 'dora'; valid: .*eora"):
        get_initializer("dora")
    with pytest.raises(ValueError, match="rank=0 .* valid: 1..8"):
        check_rank(0, 8, 12)
    with pytest.raises(ValueError, match="rank=9 .* valid: 1..8"):
        check_rank(9, 8, 12)
    with pytest.raises(ValueError, match="statistics"):
        INITIALIZERS["eora"](torch.zeros(3, 4), None, 2)
    with pytest.raises(ValueError, match="eigen_mode"):
        eora_factors(torch.zeros(3, 4), torch.eye(4), 2, eigen_mode="nope")


@pytest.mark.parametrize("bits", [2, 4])
def test_loftq_weight_error_does_not_increase_over_iterations(bits):
    from eora_ft.compress import RTN
    from eora_ft.init import loftq_factors

    delta, x, stats = _problem(6, n=16, k=64)
    weight = delta.float()  # any weight will do: LoftQ factors W itself
    errors = []
    for iters in (1, 2, 4, 8):
        factors = loftq_factors(weight, RTN(bits=bits, group_size=32), stats, 4, iters=iters)
        errors.append(float(torch.linalg.norm(weight - factors.base.dequantize() - factors.delta())))
    # (non-increasing by construction: the best iterate is returned; the raw alternation is not monotone)
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]  # the real property: alternating beats plain svd on the weight error


def test_loftq_one_iteration_is_svd_of_the_plain_error():
    from eora_ft.compress import RTN
    from eora_ft.init import loftq_factors

    delta, x, stats = _problem(8, n=16, k=64)
    weight = delta.float()
    one = loftq_factors(weight, RTN(bits=2, group_size=32), stats, 4, iters=1)
    plain = RTN(bits=2, group_size=32).compress(weight)
    assert torch.allclose(one.delta(), svd_factors(weight - plain.dequantize(), 4).delta(), atol=1e-5)
    assert torch.equal(one.base.codes, plain.codes)


def test_quantized_factors_sit_on_a_grid_and_stay_close():
    delta, x, stats = _problem(7, n=16, k=64)
    f = eora_factors(delta, stats, 8)
    q = f.quantized(4, group_size=32)
    for matrix in (q.a, q.b):
        rows = matrix.reshape(-1, 32) if matrix.shape[1] % 32 == 0 else matrix
        assert all(len(torch.unique(row)) <= 16 for row in rows)
    rel = float(torch.linalg.norm(q.delta() - f.delta()) / torch.linalg.norm(f.delta()))
    assert rel < 0.2


@pytest.mark.parametrize("n,k", [(12, 20), (20, 12)])
@pytest.mark.parametrize("mode,options", [("inverse_free", {}), ("damp", {"damp": 0.05}), ("inverse_free", {"shrink": 0.3})])
def test_output_and_input_sides_give_the_same_correction(n, k, mode, options):
    """dW C dW^T [N, N] (no K x K eigendecomposition) and the SVD of dW Q L^1/2 give the same B A."""
    delta, x, stats = _problem(3, n=n, k=k)
    for rank in (1, 4, min(n, k)):
        by_output = eora_factors(delta, stats, rank, eigen_mode=mode, side="output", **options)
        by_input = eora_factors(delta, stats, rank, eigen_mode=mode, side="input", **options)
        assert torch.allclose(by_output.delta(), by_input.delta(), atol=1e-5, rtol=1e-5)  # fp32 factors
        assert by_output.effective_rank == by_input.effective_rank == rank
    optimum = _alternating_least_squares(delta, x, 3)
    assert _weighted_error(delta, eora_factors(delta, stats, 3, side="output").delta().double(), x) == pytest.approx(
        optimum, rel=1e-5)


def test_auto_side_skips_the_input_eigendecomposition_unless_the_output_is_wider():
    delta, _, stats = _problem(4, n=8, k=24)
    eora_factors(delta, stats, 4)
    assert not stats.has_eigh  # N < K: dW C dW^T, no K x K eigendecomposition computed or cached
    eora_factors(torch.randn(40, 24, dtype=torch.float64), stats, 4)
    assert stats.has_eigh  # N > K (gate/up): the shared K x K decomposition, cached for the other linears
    with pytest.raises(ValueError, match="side='output'"):
        eora_factors(delta, stats, 4, eigen_mode="clamp", side="output")


@pytest.mark.parametrize("side", ["output", "input"])
def test_top_r_solvers_reach_the_cholesky_optimum_to_1e_6(side):
    """Large enough that the top-r eigenpairs come from subspace iteration (Grams over 256 wide), not a full
    eigendecomposition: the objective equals the fp64 full-SVD (Cholesky-whitened) optimum to 1e-6."""
    delta, x, stats = _problem(11, n=320, k=384, tokens=1500)
    for rank in (4, 16):
        eora = eora_factors(delta, stats, rank, side=side).delta().double()
        optimum = _weighted_error(delta, _cholesky_optimum(delta, stats.covariance(), rank), x)
        assert _weighted_error(delta, eora, x) == pytest.approx(optimum, rel=1e-6)
