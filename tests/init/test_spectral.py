"""Top singular directions from Gram eigenproblems: the same as a full SVD, at a fraction of the work."""

import pytest
import torch

from eora_ft.init.spectral import top_eigenpairs, top_left_singular


def _spectrum_matrix(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, min(n, k), dtype=torch.float64)
    return (u[:, :len(s)] * s) @ v[:, :len(s)].t(), s


@pytest.mark.parametrize("n,exact", [(48, False), (300, False), (300, True)])  # 48: full eigh; 300: subspace
def test_top_eigenpairs_equal_the_full_decomposition(n, exact, monkeypatch):  # iteration, or (exact) syevr
    from eora_ft.init import spectral

    if exact:  # a spectrum too flat for the iteration: the exact top-r solver takes over
        monkeypatch.setattr(spectral, "SUBSPACE_MAX_ITERATIONS", 1)
    m, _ = _spectrum_matrix(n, n, seed=n)
    gram = m @ m.t()
    values, vectors = top_eigenpairs(gram, 8)
    full_values, full_vectors = torch.linalg.eigh(gram)
    assert values.shape == (8,) and vectors.shape == (n, 8)
    assert torch.allclose(values, full_values.flip(0)[:8], rtol=1e-10, atol=1e-14)
    # eigenvectors up to sign
    overlap = (vectors * full_vectors.flip(1)[:, :8]).sum(0).abs()
    assert torch.allclose(overlap, torch.ones(8, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("shape", [(120, 400), (400, 120)])  # wide: M M^T; tall: M^T M and U = M V / S
def test_top_left_singular_vectors_equal_the_svd(shape):
    m, s_true = _spectrum_matrix(*shape, seed=1)
    u, s = top_left_singular(m, 6)
    u_svd, s_svd, _ = torch.linalg.svd(m, full_matrices=False)
    assert torch.allclose(s, s_svd[:6], rtol=1e-9)
    assert torch.allclose((u * u_svd[:, :6]).sum(0).abs(), torch.ones(6, dtype=torch.float64), atol=1e-8)
