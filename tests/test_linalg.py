"""ridgeline.linalg against dense eigendecompositions and exact traces (float64 matrices)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ridgeline import linalg
from ridgeline.errors import ConfigError, ConvergenceWarning, ShapeMismatchError

F64 = torch.float64


def _symmetric(n: int, seed: int = 0, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    if spectrum is None:
        spectrum = torch.randn(n, generator=gen, dtype=F64)
    return q @ torch.diag(spectrum) @ q.T


class MatrixOperator:
    """An operator object with matvec/matmat/shape/dtype, as CurvatureOperator provides."""

    def __init__(self, matrix):
        self.matrix, self.shape, self.dtype, self.device = matrix, matrix.shape, matrix.dtype, "cpu"
        self.calls = 0

    def matvec(self, v):
        self.calls += 1
        return self.matrix @ v

    def matmat(self, v):
        self.calls += 1
        return self.matrix @ v


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_matches_dense_eigendecomposition(which):
    a = _symmetric(80, seed=1)
    values, vectors = torch.linalg.eigh(a)
    result = linalg.lanczos(lambda v: a @ v, 80, k=4, which=which, tol=1e-8, dtype=F64)
    if which == "largest":
        values, vectors = values.flip(0), vectors.flip(1)
    assert result.converged
    torch.testing.assert_close(result.values, values[:4], rtol=1e-10, atol=1e-10)
    truth = vectors[:, :4]
    overlaps = (result.vectors @ truth).abs().diagonal()
    torch.testing.assert_close(overlaps, torch.ones(4, dtype=F64), atol=1e-7, rtol=0)


def test_lanczos_residual_estimates_equal_true_residuals():
    a = _symmetric(120, seed=2, spectrum=torch.linspace(-1, 10, 120, dtype=F64) ** 3)
    result = linalg.lanczos(lambda v: a @ v, 120, k=3, tol=1e-4, dtype=F64)
    true = (result.vectors @ a - result.values[:, None] * result.vectors).norm(dim=1)
    torch.testing.assert_close(result.residuals, true, rtol=1e-5, atol=1e-9)
    assert bool((true <= 1e-4 * result.values.abs()).all())


def test_lanczos_stops_on_residual_not_on_iteration_budget():
    a = _symmetric(200, seed=3, spectrum=torch.cat([torch.tensor([50.0, 20.0], dtype=F64),
                                                    torch.rand(198, dtype=F64)]))
    result = linalg.lanczos(lambda v: a @ v, 200, k=1, tol=1e-6, dtype=F64)
    assert result.converged and result.matvecs < 40
    assert abs(result.values[0].item() - 50.0) < 1e-9


def test_lanczos_finds_eigenvalues_beyond_an_invariant_krylov_space():
    # rank-3 PSD matrix: the Krylov space of any start vector is invariant after 4 steps
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(30, 3, generator=gen, dtype=F64)
    a = u @ u.T
    expected = torch.linalg.eigvalsh(a).flip(0)[:5]
    result = linalg.lanczos(lambda v: a @ v, 30, k=5, tol=1e-8, dtype=F64)
    torch.testing.assert_close(result.values[:3], expected[:3], rtol=1e-10, atol=1e-10)
    assert result.values[3:].abs().max() < 1e-10


def test_lanczos_accepts_operator_objects_and_warm_starts():
    a = _symmetric(60, seed=5)
    op = MatrixOperator(a)
    cold = linalg.lanczos(op, k=1, tol=1e-8)
    warm = linalg.lanczos(op, k=1, tol=1e-8, v0=cold.vectors[0])
    assert warm.matvecs < cold.matvecs
    torch.testing.assert_close(warm.values, cold.values)


def test_lanczos_non_convergence_warns_and_returns_estimates():
    a = _symmetric(100, seed=6)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        result = linalg.lanczos(lambda v: a @ v, 100, k=2, tol=1e-12, max_iter=6, dtype=F64)
    assert not result.converged and result.matvecs == 6 and result.values.shape == (2,)
    assert bool((result.residuals > 0).all())


def test_lanczos_rejects_bad_requests():
    a = _symmetric(10)
    with pytest.raises(ConfigError, match="only 10"):
        linalg.lanczos(lambda v: a @ v, 10, k=11, dtype=F64)
    with pytest.raises(ConfigError, match="which"):
        linalg.lanczos(lambda v: a @ v, 10, which="middle", dtype=F64)
    with pytest.raises(ShapeMismatchError):
        linalg.lanczos(lambda v: v[:5], 10, dtype=F64)
    with pytest.raises(ConfigError, match="dim is required"):
        linalg.lanczos(lambda v: a @ v)


def test_lanczos_is_deterministic_per_seed():
    a = _symmetric(50, seed=7)
    one = linalg.lanczos(lambda v: a @ v, 50, k=2, tol=1e-3, dtype=F64, seed=3)
    two = linalg.lanczos(lambda v: a @ v, 50, k=2, tol=1e-3, dtype=F64, seed=3)
    assert torch.equal(one.values, two.values) and one.matvecs == two.matvecs


def test_power_iteration_baseline_finds_dominant_pairs():
    a = _symmetric(40, seed=8, spectrum=torch.cat([torch.tensor([9.0, 5.0], dtype=F64),
                                                   torch.rand(38, dtype=F64)]))
    result = linalg.power_iteration(lambda v: a @ v, 40, k=2, tol=1e-10, max_iter=500, dtype=F64)
    torch.testing.assert_close(result.values, torch.tensor([9.0, 5.0], dtype=F64), rtol=1e-6,
                               atol=0)
    assert result.method == "power"


def test_power_iteration_stopped_at_max_iter_reports_unit_vectors_and_true_residuals():
    """Too few iterations to converge: the result must still be honest against eigh —
    orthonormal vectors, θ their Rayleigh quotients, residuals ‖Av − θv‖ recomputed here,
    and the error of θ bounded by the residual (Weyl/Kato–Temple, dense spectrum)."""
    a = _symmetric(30, seed=4, spectrum=torch.linspace(1.0, 3.0, 30, dtype=F64))
    result = linalg.power_iteration(lambda v: a @ v, 30, k=3, tol=1e-14, max_iter=4,
                                    dtype=F64)
    assert not result.converged
    vectors = result.vectors
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(3, dtype=F64), atol=1e-12,
                               rtol=0)
    rayleigh = torch.einsum("kp,pq,kq->k", vectors, a, vectors)
    torch.testing.assert_close(result.values, rayleigh, atol=1e-12, rtol=0)
    residuals = (vectors @ a - rayleigh[:, None] * vectors).norm(dim=1)
    torch.testing.assert_close(result.residuals, residuals, atol=1e-12, rtol=0)
    exact = torch.from_numpy(np.linalg.eigh(a.numpy())[0])
    gap = (exact[:, None] - result.values[None, :]).abs().amin(0)
    assert torch.all(gap <= result.residuals + 1e-12)  # some eigenvalue within the residual


def test_hutchinson_estimate_lies_within_its_reported_error():
    a = _symmetric(200, seed=9, spectrum=torch.rand(200, dtype=F64) * 2 + 1)
    exact = torch.trace(a).item()
    result = linalg.hutchinson(lambda v: a @ v, 200, rtol=0.01, max_matvecs=2000, dtype=F64)
    assert result.converged and result.stderr <= 0.01 * abs(result.value)
    assert abs(result.value - exact) <= 4 * result.stderr
    assert len(result.estimates) == result.samples == result.matvecs


def test_hutchinson_is_exact_for_a_diagonal_matrix():
    d = torch.linspace(1, 3, 50, dtype=F64)
    result = linalg.hutchinson(lambda v: d * v, 50, rtol=1e-6, dtype=F64)
    assert result.value == pytest.approx(d.sum().item(), rel=1e-12) and result.stderr < 1e-9


def test_hutchpp_is_exact_with_a_full_sketch_and_unbiased_otherwise():
    a = _symmetric(30, seed=10)
    exact = torch.trace(a).item()
    full = linalg.hutchpp(MatrixOperator(a), rank=30, max_matvecs=100)
    assert full.value == pytest.approx(exact, abs=1e-10) and full.stderr == 0.0
    spiky = _symmetric(300, seed=11, spectrum=torch.cat([torch.full((5,), 100.0, dtype=F64),
                                                         torch.rand(295, dtype=F64)]))
    exact = torch.trace(spiky).item()
    plus = linalg.hutchpp(MatrixOperator(spiky), rank=10, rtol=0.01, max_matvecs=3000,
                          block_size=8)
    plain = linalg.hutchinson(MatrixOperator(spiky), rtol=0.01, max_matvecs=3000, block_size=8)
    assert abs(plus.value - exact) <= 4 * plus.stderr
    assert plus.matvecs < plain.matvecs  # deflating the spikes removes most of the variance


def test_trace_budget_exhaustion_warns():
    a = _symmetric(50, seed=12)  # trace near zero: the relative error target is unreachable
    with pytest.warns(ConvergenceWarning, match="max_matvecs"):
        result = linalg.hutchinson(lambda v: a @ v, 50, rtol=1e-4, max_matvecs=20, dtype=F64)
    assert not result.converged and result.matvecs == 20


def test_slq_nodes_are_the_eigenvalues_when_steps_reach_the_dimension():
    a = _symmetric(25, seed=13)
    result = linalg.slq_density(MatrixOperator(a), runs=2, steps=25)
    used = result.weights[0] > 1e-14
    nodes = np.sort(result.nodes[0][used].numpy())
    np.testing.assert_allclose(nodes, torch.linalg.eigvalsh(a).numpy(), atol=1e-8)


def test_slq_moments_match_eigenvalue_moments_within_their_standard_error():
    eig = torch.linspace(-1, 4, 60, dtype=F64)
    a = _symmetric(60, seed=14, spectrum=eig)
    result = linalg.slq_density(MatrixOperator(a), runs=300, steps=12, seed=1)
    for p in (1, 2, 3, 4):
        per_run = (result.weights * result.nodes ** p).sum(dim=1)
        stderr = per_run.std().item() / np.sqrt(per_run.numel())
        truth = (eig ** p).mean().item()
        assert abs(result.moment(p) - truth) <= 4 * stderr + 1e-12, p
    area = np.trapezoid(result.density.numpy(), result.grid.numpy())
    assert area == pytest.approx(1.0, abs=1e-3)


def test_results_are_json_safe_and_plot():
    a = _symmetric(20, seed=15)
    op = MatrixOperator(a)
    for result in (linalg.lanczos(op, k=2), linalg.hutchinson(op, rtol=0.5),
                   linalg.slq_density(op, runs=2, steps=5)):
        json.dumps(result.to_dict())
        assert result.plot() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linalg.lanczos(op, k=1)
