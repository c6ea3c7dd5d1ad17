"""The driver accumulates fp64 X^T X only when the compressor or an initializer reads it (issue #34 item 11:
RTN/NF4 with qlora or svd spent ~15 min of fp64 GEMMs at 70B on statistics nothing used), and skipping them
changes no result."""

import copy

import pytest
import torch

from eora_ft.compress import make_compressor, needs_statistics
from eora_ft.compress.stats import ActivationStats
from eora_ft.init import INITIALIZERS, STATISTICS_INITS, act_diag_factors, eora_factors, init_needs_statistics
from eora_ft.init.sequential import compress_model

LINEARS = ["k_proj", "down_proj"]  # one linear of each input width keeps the runs short


@pytest.fixture
def accumulations(monkeypatch) -> list[int]:
    """Every ``ActivationStats.add_batch`` call, counted (the original still runs)."""
    calls: list[int] = []
    original = ActivationStats.add_batch

    def spy(self, x, token_mask=None):
        calls.append(x.shape[-1])
        return original(self, x, token_mask)

    monkeypatch.setattr(ActivationStats, "add_batch", spy)
    return calls


def _run(model, method, inits, **kwargs):
    ids = torch.randint(1, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    compressor = make_compressor(method, bits=2, group_size=64)
    return compress_model(model, ids, compressor, inits, rank=4, target_modules=LINEARS, progress=False,
                          init_options={"loftq": {"iters": 2}}, **kwargs)


@pytest.mark.parametrize("inits", [["qlora", "svd"], ["loftq"], ["pissa"]])
def test_rtn_with_data_free_inits_accumulates_nothing_and_gives_the_same_adapters(nano_model_and_tokenizer,
                                                                                   accumulations, inits):
    skipped_model, reported_model = (copy.deepcopy(nano_model_and_tokenizer[0]) for _ in range(2))
    skipped = _run(skipped_model, "rtn", inits)
    assert accumulations == []
    assert all(set(row) == {"layer"} | {f"effective_rank/{name}" for name in inits} for row in skipped.layers)
    reported = _run(reported_model, "rtn", inits, output_errors=True)  # statistics for the report alone
    assert accumulations and all("rel_out_err/compressed" in row for row in reported.layers)
    for path, per_init in reported.factors.items():
        for name, factors in per_init.items():
            assert torch.equal(skipped.factors[path][name].a, factors.a)
            assert torch.equal(skipped.factors[path][name].b, factors.b)
    for (name, a), b in zip(skipped_model.state_dict().items(), reported_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method, inits", [("gptq", ["svd"]), ("rtn", ["eora"]), ("rtn", ["act_diag"])])
def test_a_compressor_or_initializer_that_reads_statistics_gets_them(nano_model_and_tokenizer, accumulations,
                                                                      method, inits):
    result = _run(copy.deepcopy(nano_model_and_tokenizer[0]), method, inits)
    assert accumulations
    assert all(row["rel_out_err/compressed"] > 0 and f"rel_out_err/{inits[0]}" in row for row in result.layers)


def test_output_errors_false_keeps_the_statistics_but_skips_the_report(nano_model_and_tokenizer):
    result = _run(copy.deepcopy(nano_model_and_tokenizer[0]), "gptq", ["svd"], output_errors=False)
    assert not result.error_curves and not any("rel_out_err/compressed" in row for row in result.layers)


def test_every_registered_compressor_and_initializer_declares_its_needs():
    assert {name for name in INITIALIZERS if init_needs_statistics(name, None)} == STATISTICS_INITS
    rtn, gptq = make_compressor("rtn"), make_compressor("gptq")
    assert not needs_statistics(rtn) and needs_statistics(gptq) and needs_statistics(make_compressor("wanda"))
    assert not init_needs_statistics("loftq", rtn) and init_needs_statistics("loftq", gptq)  # re-runs GPTQ
    with pytest.raises(ValueError, match="unknown init method 'pca'"):
        init_needs_statistics("pca", rtn)


def test_act_diag_equals_eora_on_the_diagonal_eigendecomposition_bit_for_bit():
    """act_diag reads the covariance's diagonal and forms no identity; its factors are EoRA's given (diag C, I)."""
    g = torch.Generator().manual_seed(3)
    stats = ActivationStats(96)
    x = torch.randn(500, 96, generator=g)
    x[:, 7] = 0  # an input that never fires
    stats.add_batch(x)
    for shape in [(40, 96), (160, 96)]:
        delta = torch.randn(*shape, generator=g)
        want = eora_factors(delta, (torch.diag(stats.covariance()), torch.eye(96, dtype=torch.float64)), 8)
        for source in (stats, stats.covariance()):
            got = act_diag_factors(delta, source, 8)
            assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b)
            assert got.effective_rank == want.effective_rank
