"""Infinite-width NNGP/NTK against quadrature and Monte Carlo over wide networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.kernels import empirical_ntk, infinite_nngp, infinite_ntk, relative_error
from ridgeline.models import mlp


def _gauss_expectation(fn, k11: float, k22: float, k12: float, nodes: int = 400) -> float:
    """E[fn(u, v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]) by 2-D Gauss–Hermite."""
    from scipy.special import roots_hermitenorm

    z, w = roots_hermitenorm(nodes)
    w = w / w.sum()
    chol = np.linalg.cholesky(np.array([[k11, k12], [k12, k22]]) + 1e-300 * np.eye(2))
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    u = chol[0, 0] * z1
    v = chol[1, 0] * z1 + chol[1, 1] * z2
    return float((np.outer(w, w) * fn(u, v)).sum())


def _expect_pair(activation: str, k11: float, k22: float, k12: float) -> tuple[float, float]:
    """(E[φ(u)φ(v)], E[φ'(u)φ'(v)]) numerically: Gauss–Hermite for erf; for ReLU a 1-D
    adaptive integral of u·E[relu(v) | u] over u > 0 and scipy's bivariate normal CDF for
    the step product P(u > 0, v > 0)."""
    from scipy.integrate import quad
    from scipy.special import erf
    from scipy.stats import multivariate_normal, norm

    k12 = min(k12, math.sqrt(k11 * k22) * (1 - 1e-9))  # keep the covariance definite
    if activation == "relu":
        spread = math.sqrt(k22 - k12 ** 2 / k11)

        def integrand(u: float) -> float:
            mean = k12 / k11 * u  # v | u ~ N(mean, spread²)
            relu_v = mean * norm.cdf(mean / spread) + spread * norm.pdf(mean / spread)
            return u * relu_v * norm.pdf(u, scale=math.sqrt(k11))

        value = quad(integrand, 0, np.inf, epsabs=1e-12, epsrel=1e-10)[0]
        step = multivariate_normal(mean=[0, 0], cov=[[k11, k12], [k12, k22]]).cdf([0, 0])
        return value, float(step)
    value = _gauss_expectation(lambda u, v: erf(u) * erf(v), k11, k22, k12)
    slope = _gauss_expectation(lambda u, v: 4 / math.pi * np.exp(-u ** 2 - v ** 2), k11, k22, k12)
    return value, slope


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_deep_kernels_match_layer_by_layer_quadrature(activation):
    """Σ^{l+1} = σ_w² E[φ(u)φ(v)] + σ_b², Θ^{l+1} = Σ^{l+1} + σ_w² E[φ'(u)φ'(v)] Θ^l with
    every expectation integrated numerically instead of in closed form."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    w, b, depth = 1.7, 0.2, 3
    nngp = infinite_nngp(x, depth=depth, activation=activation, weight_var=w, bias_var=b).numpy()
    ntk = infinite_ntk(x, depth=depth, activation=activation, weight_var=w, bias_var=b).numpy()
    s1 = (w * x @ x.T / 4 + b).numpy()
    tol = 1e-4 if activation == "relu" else 1e-7
    for i, j in ((0, 0), (0, 1), (1, 2)):
        k11, k22, k12 = s1[i, i], s1[j, j], s1[i, j]
        theta = k12
        for _ in range(depth):
            value, slope = _expect_pair(activation, k11, k22, k12)
            v11, _ = _expect_pair(activation, k11, k11, k11)
            v22, _ = _expect_pair(activation, k22, k22, k22)
            k12 = w * value + b
            theta = k12 + w * slope * theta
            k11, k22 = w * v11 + b, w * v22 + b
        assert nngp[i, j] == pytest.approx(k12, rel=tol, abs=tol)
        assert ntk[i, j] == pytest.approx(theta, rel=tol, abs=tol)


def test_depth_zero_is_the_linear_kernel():
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = 2.0 * x @ x.T / 3 + 0.5
    torch.testing.assert_close(infinite_ntk(x, depth=0, weight_var=2.0, bias_var=0.5), expected)
    torch.testing.assert_close(infinite_nngp(x, depth=0, weight_var=2.0, bias_var=0.5), expected)


def test_relu_nngp_on_the_unit_circle_has_the_arc_cosine_form():
    """Cho & Saul (2009): for unit inputs and σ_w² = 2, σ_b = 0, one ReLU layer gives
    k(θ) = (sin θ + (π − θ) cos θ)/π, which is 1 at θ = 0 and 1/π at θ = π/2."""
    angles = torch.tensor([0.0, math.pi / 2, math.pi], dtype=torch.float64)
    x = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    k = infinite_nngp(x[:1], x, depth=1, weight_var=2.0, bias_var=0.0).flatten()
    # Σ¹ = 2·x·x'/2 = cos θ, so Σ² = 2 · (sin θ + (π − θ) cos θ)/(2π)
    torch.testing.assert_close(k, torch.tensor([1.0, 1 / math.pi, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_infinite_ntk_matches_monte_carlo_within_sampling_error(activation):
    """With one hidden layer the empirical NTK (per output) is an unbiased Monte Carlo
    estimate of the limit at any width (an average over i.i.d. neurons): the mean over
    independent networks must lie within a few standard errors of it."""
    w_var, b_var = 1.5, 0.1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    limit = infinite_ntk(x, depth=1, activation=activation, weight_var=w_var, bias_var=b_var)
    samples = []
    for seed in range(12):
        torch.manual_seed(seed)
        net = mlp(3, [1024], 3, parameterization="ntk", activation=activation,
                  weight_std=math.sqrt(w_var), bias_std=math.sqrt(b_var)).double()
        samples.append(empirical_ntk(net, x, trace="mean"))
    samples = torch.stack(samples)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    z = ((mean - limit).abs() / se.clamp_min(1e-12))
    assert float(z.max()) < 4.5, f"max z-score {float(z.max()):.2f}"
    assert relative_error(mean, limit) < 0.02


def test_infinite_nngp_matches_monte_carlo_over_neurons():
    """σ_w²·φ(h)·φ(h')/n + σ_b² on the last hidden layer is a Monte Carlo estimate of the
    NNGP: unbiased with one hidden layer (z-scores over networks), and converging at the
    Monte Carlo rate 1/√n with three."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w_var, b_var = 2.0, 0.05

    def estimate(depth: int, width: int, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        net = mlp(4, [width] * depth, 1, parameterization="ntk", weight_std=math.sqrt(w_var),
                  bias_std=math.sqrt(b_var)).double()
        with torch.no_grad():
            features = net[:-1](x)  # everything but the read-out layer
        return w_var * features @ features.T / width + b_var

    limit = infinite_nngp(x, depth=1, weight_var=w_var, bias_var=b_var)
    samples = torch.stack([estimate(1, 512, seed) for seed in range(16)])
    z = (samples.mean(0) - limit).abs() / (samples.std(0) / 4).clamp_min(1e-12)
    assert float(z.max()) < 4.5, f"max z-score {float(z.max()):.2f}"
    deep = infinite_nngp(x, depth=3, weight_var=w_var, bias_var=b_var)
    errors = [sum(relative_error(estimate(3, width, s), deep) for s in range(3)) / 3
              for width in (256, 8192)]
    assert errors[1] < errors[0] / 3 and errors[1] < 0.06


def test_deep_empirical_ntk_converges_with_width():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    limit = infinite_ntk(x, depth=3, weight_var=2.0, bias_var=0.1)
    errors = {}
    for width in (64, 2048):
        errs = []
        for seed in range(4):
            torch.manual_seed(seed)
            net = mlp(3, [width] * 3, 1, parameterization="ntk", weight_std=math.sqrt(2.0),
                      bias_std=math.sqrt(0.1)).double()
            errs.append(relative_error(empirical_ntk(net, x, trace="mean"), limit))
        errors[width] = sum(errs) / len(errs)
    assert errors[2048] < errors[64] / 2.5
    assert errors[2048] < 0.1


def test_infinite_kernels_reject_bad_arguments():
    x = torch.randn(3, 2)
    with pytest.raises(ConfigError, match="depth"):
        infinite_ntk(x, depth=-1)
    with pytest.raises(ConfigError, match="activation"):
        infinite_ntk(x, depth=1, activation="tanh")
    with pytest.raises(ConfigError, match="weight_var"):
        infinite_nngp(x, depth=1, weight_var=-1.0)
    with pytest.raises(ShapeMismatchError, match="features"):
        infinite_ntk(x, torch.randn(3, 5), depth=1)
    with pytest.raises(ShapeMismatchError, match=r"\(N, d\)"):
        infinite_ntk(torch.randn(3), depth=1)


def test_output_dtype_follows_the_inputs_and_cross_kernel_matches_gram_block():
    x = torch.randn(7, 3)
    full = infinite_ntk(x, depth=2)
    assert full.dtype == torch.float32 and full.shape == (7, 7)
    torch.testing.assert_close(infinite_ntk(x[:3], x[3:], depth=2), full[:3, 3:])
