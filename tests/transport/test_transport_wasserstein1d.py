"""Exact 1-D Wasserstein distances against scipy, linear programming, closed forms and POT."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

from ridgeline.transport import sliced_wasserstein, wasserstein_1d
from ridgeline.transport.wasserstein1d import sort_last


def exact_wp_power_by_linear_program(u, v, a, b, p):
    """min_π Σ π_ij |u_i − v_j|^p over couplings of a and b, by scipy's LP solver."""
    n, m = len(u), len(v)
    cost = np.abs(u[:, None] - v[None, :]) ** p
    rows = np.zeros((n + m, n * m))
    for i in range(n):
        rows[i, i * m:(i + 1) * m] = 1
    for j in range(m):
        rows[n + j, j::m] = 1
    result = scipy.optimize.linprog(cost.ravel(), A_eq=rows, b_eq=np.concatenate([a, b]),
                                    bounds=(0, None), method="highs")
    assert result.status == 0
    return result.fun


@pytest.mark.parametrize("n,m", [(50, 50), (37, 81)])
def test_w1_matches_scipy_wasserstein_distance(n, m):
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=n), rng.gamma(2.0, size=m)
    ours = wasserstein_1d(torch.from_numpy(u), torch.from_numpy(v), p=1)
    assert float(ours) == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-10)


def test_weighted_w1_matches_scipy():
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=30), rng.normal(1.0, 2.0, size=45)
    a, b = rng.random(30), rng.random(45)
    a, b = a / a.sum(), b / b.sum()
    ours = wasserstein_1d(u, v, p=1, weights_x=a, weights_y=b)
    assert float(ours) == pytest.approx(scipy.stats.wasserstein_distance(u, v, a, b), rel=1e-9)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 1.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_wp_matches_linear_program(p, weighted):
    rng = np.random.default_rng(int(10 * p) + weighted)
    u, v = rng.normal(size=6), rng.normal(0.5, 1.5, size=9)
    a = rng.random(6) if weighted else np.ones(6)
    b = rng.random(9) if weighted else np.ones(9)
    a, b = a / a.sum(), b / b.sum()
    truth = exact_wp_power_by_linear_program(u, v, a, b, p) ** (1 / p)
    ours = wasserstein_1d(u, v, p=p, weights_x=a if weighted else None,
                          weights_y=b if weighted else None)
    assert float(ours) == pytest.approx(truth, rel=1e-7, abs=1e-10)


def test_w2_between_gaussians_matches_closed_form():
    """W_2²(N(m1, s1²), N(m2, s2²)) = (m1 − m2)² + (s1 − s2)², with atoms at the
    Gaussians' quantiles (the empirical measure converges to the Gaussian as n grows)."""
    n, m = 20000, 30000
    (m1, s1), (m2, s2) = (0.3, 1.2), (-1.0, 0.5)
    z = lambda k: scipy.stats.norm.ppf((np.arange(k) + 0.5) / k)  # noqa: E731
    u, v = m1 + s1 * z(n), m2 + s2 * z(m)
    truth = np.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2)
    assert float(wasserstein_1d(u, v, p=2)) == pytest.approx(truth, rel=2e-4)


def test_sliced_wasserstein_in_one_dimension_is_exact_wp():
    """In d = 1 every direction is ±1 and W_p is sign-invariant, so SW_p = W_p exactly."""
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=40), rng.exponential(size=25)
    for p in (1, 2):
        truth = (scipy.stats.wasserstein_distance(u, v) if p == 1
                 else exact_wp_power_by_linear_program(u, v, np.full(40, 1 / 40),
                                                       np.full(25, 1 / 25), 2) ** 0.5)
        ours = sliced_wasserstein(torch.from_numpy(u)[:, None], torch.from_numpy(v)[:, None],
                                  projections=7, p=p, seed=0)
        assert float(ours) == pytest.approx(truth, rel=1e-7)


def test_batched_one_dimensional_distances_match_one_by_one():
    rng = np.random.default_rng(4)
    u, v = torch.from_numpy(rng.normal(size=(3, 4, 10))), torch.from_numpy(rng.normal(size=(3, 4, 13)))
    batched = wasserstein_1d(u, v, p=2)
    assert batched.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert float(batched[i, j]) == pytest.approx(float(wasserstein_1d(u[i, j], v[i, j])))


def test_numpy_and_torch_sorts_agree_with_and_without_gradients():
    values = torch.randn(7, 33, dtype=torch.float64)
    assert torch.equal(sort_last(values), values.sort(-1).values)
    leaf = values.clone().requires_grad_(True)
    ordered, order = sort_last(leaf, indices=True)
    assert torch.equal(ordered.detach(), values.sort(-1).values)
    ordered.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(values))
    half = values.to(torch.bfloat16)
    assert torch.equal(sort_last(half), half.sort(-1).values)


@pytest.mark.parametrize("p", [1, 2])
def test_unequal_sizes_and_weights_agree_with_pot(p):
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(5 + p)
    u, v = rng.normal(size=(64,)), rng.normal(0.2, 0.8, size=(91,))
    a, b = rng.random(64), rng.random(91)
    a, b = a / a.sum(), b / b.sum()
    for weights in ((None, None), (a, b)):
        pot = ot.wasserstein_1d(u, v, *weights, p=p) ** (1 / p)
        ours = wasserstein_1d(u, v, p=p, weights_x=weights[0], weights_y=weights[1])
        assert float(ours) == pytest.approx(float(pot), rel=1e-9)
