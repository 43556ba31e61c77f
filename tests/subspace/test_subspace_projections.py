"""Random projections: checked against explicit matrices built independently (scipy's
Hadamard matrix, scipy.sparse) and against closed-form norms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from ridgeline.errors import ConfigError, MemoryBudgetError
from ridgeline.subspace import (
    DenseProjection,
    FastfoodProjection,
    SparseProjection,
    fwht,
    make_projection,
    projection_bytes,
)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fwht_equals_scipy_hadamard_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64)
    expected = x @ torch.from_numpy(hadamard(n).astype(np.float64)).T
    torch.testing.assert_close(fwht(x), expected, rtol=1e-12, atol=1e-10)


def sylvester_reference(x: torch.Tensor) -> torch.Tensor:
    """H_2m [a; b] = [H_m a + H_m b; H_m a − H_m b], straight from the definition."""
    if x.shape[-1] == 1:
        return x
    half = x.shape[-1] // 2
    a, b = sylvester_reference(x[..., :half]), sylvester_reference(x[..., half:])
    return torch.cat([a + b, a - b], dim=-1)


@pytest.mark.parametrize("n", [2**7, 2**13])
def test_fwht_with_several_kronecker_factors_equals_the_recursive_definition(n):
    x = torch.randn(2, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), sylvester_reference(x), rtol=1e-12, atol=1e-9)


def test_fwht_twice_is_n_times_identity():
    x = torch.randn(5, 128, dtype=torch.float64)
    torch.testing.assert_close(fwht(fwht(x)), 128 * x)


def test_fwht_rejects_non_power_of_two_lengths():
    with pytest.raises(ConfigError, match="power-of-two"):
        fwht(torch.zeros(12))


def explicit_fastfood(proj: FastfoodProjection) -> np.ndarray:
    """The D × d Fastfood matrix from its random state, with scipy's Hadamard matrix."""
    n, d_pad = proj.blocks, proj.d_pad
    h = hadamard(d_pad).astype(np.float64)
    blocks = []
    for i in range(n):
        perm = np.zeros((d_pad, d_pad))
        perm[np.arange(d_pad), proj.perm[i].numpy()] = 1.0  # (Π x)_k = x_{perm[k]}
        g = proj.gauss[i].double().numpy()
        b = proj.signs[i].double().numpy()
        v = h @ np.diag(g) @ perm @ h @ np.diag(b)
        blocks.append(v / math.sqrt(d_pad * (g ** 2).sum()))
    full = np.concatenate(blocks)[:proj.num_params, :proj.dim]
    return full * math.sqrt(d_pad / proj.num_params)


@pytest.mark.parametrize("num_params,dim", [(50, 5), (64, 8), (300, 33), (7, 7), (40, 1)])
def test_fastfood_equals_its_explicit_matrix(num_params, dim):
    proj = FastfoodProjection(num_params, dim, seed=3, dtype=torch.float64)
    expected = torch.from_numpy(explicit_fastfood(proj))
    z = torch.randn(4, dim, dtype=torch.float64)
    torch.testing.assert_close(proj(z), z @ expected.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(proj.materialize(chunk_size=3), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(num_params=st.integers(2, 200), dim_frac=st.floats(0.01, 1.0),
       a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 10_000))
def test_fastfood_is_linear(num_params, dim_frac, a, b, seed):
    dim = max(1, int(dim_frac * num_params))
    proj = FastfoodProjection(num_params, dim, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(dim, generator=gen, dtype=torch.float64)
    y = torch.randn(dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(proj(a * x + b * y), a * proj(x) + b * proj(y), rtol=1e-9, atol=1e-9)
    assert torch.count_nonzero(proj(torch.zeros(dim, dtype=torch.float64))) == 0


@pytest.mark.parametrize("dim", [8, 5, 16])
def test_fastfood_columns_have_unit_norm_when_blocks_fit(dim):
    # D a multiple of d_pad: every column of every normalised block has norm exactly 1
    d_pad = 1 << (dim - 1).bit_length()
    proj = FastfoodProjection(4 * d_pad, dim, seed=1, dtype=torch.float64)
    norms = torch.from_numpy(explicit_fastfood(proj)).norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(dim, dtype=torch.float64))


def test_fastfood_mean_squared_column_norm_is_one_with_a_cut_block():
    # d = d_pad: every row of a normalised block has squared norm 1 over the d_pad columns,
    # so the kept D rows, rescaled by d_pad/D, give a mean squared column norm of exactly 1
    proj = FastfoodProjection(100, 16, seed=2, dtype=torch.float64)
    sq = (torch.from_numpy(explicit_fastfood(proj)) ** 2).sum(0)
    assert float(sq.mean()) == pytest.approx(1.0, rel=1e-12)
    assert float(sq.std()) > 0  # the cut block makes individual norms differ


def test_fastfood_memory_is_linear_in_num_params():
    small = FastfoodProjection(10_000, 1000)
    large = FastfoodProjection(100_000, 1000)
    assert large.memory_bytes() < 12 * small.memory_bytes()
    assert large.memory_bytes() <= 24 * 100_000 * 1.03  # signs, gauss (4 B) + perm (8 B) ≈ 16 B per row
    assert projection_bytes("fastfood", 100_000, 1000) == large.memory_bytes()


def test_dense_columns_have_unit_norm_and_orthogonal_columns_are_orthonormal():
    dense = DenseProjection(200, 20, seed=0, dtype=torch.float64)
    torch.testing.assert_close(dense.matrix.norm(dim=0), torch.ones(20, dtype=torch.float64))
    ortho = DenseProjection(200, 20, seed=0, orthogonal=True, dtype=torch.float64)
    torch.testing.assert_close(ortho.matrix.T @ ortho.matrix, torch.eye(20, dtype=torch.float64))
    assert projection_bytes("dense", 200, 20, torch.float64) == dense.memory_bytes()


def test_sparse_product_equals_scipy_sparse_matrix_and_columns_have_unit_norm():
    proj = SparseProjection(2000, 30, seed=4, dtype=torch.float64)
    matrix = scipy.sparse.coo_matrix((proj.values.numpy(), (proj.rows.numpy(), proj.cols.numpy())),
                                     shape=(2000, 30)).toarray()
    z = np.random.default_rng(0).standard_normal(30)
    np.testing.assert_allclose(proj(torch.from_numpy(z)).numpy(), matrix @ z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=0), np.ones(30), rtol=1e-12)
    # every nonzero of a column has the same magnitude 1/√(count) and a sign
    counts = (matrix != 0).sum(0)
    np.testing.assert_allclose(np.abs(matrix).max(0), 1 / np.sqrt(counts))


def test_sparse_density_is_one_over_sqrt_d():
    num_params, dim = 40_000, 200
    proj = SparseProjection(num_params, dim, seed=0)
    p = 1 / math.sqrt(num_params)
    mean, sd = num_params * dim * p, math.sqrt(num_params * dim * p * (1 - p))
    assert abs(proj.nnz - mean) < 5 * sd
    pairs = proj.cols * num_params + proj.rows
    assert pairs.unique().numel() == proj.nnz  # no duplicate entries
    signs = torch.sign(proj.values)
    assert abs(float(signs.mean())) < 5 / math.sqrt(proj.nnz)


def test_sparse_gives_every_column_a_nonzero_entry():
    proj = SparseProjection(30, 30, seed=0, density=0.01)
    assert torch.bincount(proj.cols, minlength=30).min() >= 1


def test_same_seed_same_projection_other_seed_differs():
    for cls in (DenseProjection, SparseProjection, FastfoodProjection):
        a, b, c = cls(300, 10, seed=1), cls(300, 10, seed=1), cls(300, 10, seed=2)
        torch.testing.assert_close(a.materialize(), b.materialize())
        assert not torch.allclose(a.materialize(), c.materialize())


def test_dense_over_memory_budget_raises_before_allocating():
    with pytest.raises(MemoryBudgetError, match="fastfood"):
        make_projection("dense", 10**7, 10**4, memory_budget=2**30)
    proj = make_projection("fastfood", 10**5, 10**3, memory_budget=2**24)
    assert proj.memory_bytes() <= 2**24


def test_unknown_projection_name_is_rejected():
    with pytest.raises(ConfigError, match="unknown projection 'gaussian'"):
        make_projection("gaussian", 10, 2)
