"""Max-sliced and distributional sliced Wasserstein, and the von Mises–Fisher sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.transport import (
    distributional_sliced_wasserstein,
    max_sliced_wasserstein,
    random_directions,
    sliced_wasserstein,
    vmf_directions,
)

F64 = torch.float64


def bessel_ratio(d: int, kappa: float) -> float:
    """A_d(κ) = I_{d/2}(κ) / I_{d/2−1}(κ), the mean resultant length of vMF on S^{d−1}."""
    return scipy.special.ive(d / 2, kappa) / scipy.special.ive(d / 2 - 1, kappa)


def test_max_sw_of_a_translation_is_the_shift_length_with_the_right_gradient():
    """W_2 along θ between x and x + c is |θᵀc|: max-SW_2 = ‖c‖ at θ* = ±c/‖c‖ and
    ∇_c max-SW_2 = c/‖c‖."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(150, 12, generator=gen, dtype=F64)
    c = torch.randn(12, generator=gen, dtype=F64).requires_grad_(True)
    value, theta = max_sliced_wasserstein(x, x + c, seed=0, return_direction=True)
    assert float(value.detach()) == pytest.approx(float(c.detach().norm()), rel=1e-8)
    assert abs(float(theta @ c.detach())) == pytest.approx(float(c.detach().norm()), rel=1e-8)
    value.backward()
    assert torch.allclose(c.grad, c.detach() / c.detach().norm(), atol=1e-6)


def test_max_sw_finds_the_stretched_axis_and_beats_random_directions():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 20, generator=gen, dtype=F64)
    scale = torch.ones(20, dtype=F64)
    scale[7] = 4.0
    y = torch.randn(400, 20, generator=gen, dtype=F64) * scale
    value, theta = max_sliced_wasserstein(x, y, seed=0, return_direction=True, init_draws=8)
    assert abs(float(theta[7])) > 0.99
    # Best of 2000 random directions, W_1 by scipy along each of them (p = 1 run).
    value_1 = max_sliced_wasserstein(x, y, p=1, seed=0)
    directions = random_directions(20, 2000, seed=5, dtype=F64).numpy()
    px, py = x.numpy() @ directions.T, y.numpy() @ directions.T
    best_random = max(scipy.stats.wasserstein_distance(px[:, k], py[:, k]) for k in range(2000))
    assert float(value_1) >= best_random
    # N(0,1) vs N(0,16) along e_7: W_2 = |4 − 1| = 3 up to sampling error.
    assert float(value) == pytest.approx(3.0, rel=0.1)


def test_max_sw_is_batched_and_bounds_sliced_wasserstein():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 60, 5, generator=gen, dtype=F64)
    y = torch.randn(3, 70, 5, generator=gen, dtype=F64) * 2 + 1
    batched = max_sliced_wasserstein(x, y, seed=0, steps=60)
    assert batched.shape == (3,)
    for i in range(3):
        one = max_sliced_wasserstein(x[i], y[i], seed=0, steps=60)
        assert float(batched[i]) == pytest.approx(float(one), rel=1e-6)
        assert float(one) >= float(sliced_wasserstein(x[i], y[i], projections=500, seed=0))


def test_vmf_cosine_matches_scipy_von_mises_fisher():
    mu = torch.tensor([0.0, 0.6, 0.0, 0.8], dtype=F64)
    ours = (vmf_directions(mu, 5.0, 20_000, seed=0) @ mu).numpy()
    reference = scipy.stats.vonmises_fisher(mu.numpy(), 5.0).rvs(20_000, random_state=1)
    assert scipy.stats.ks_2samp(ours, reference @ mu.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("d,kappa", [(3, 2.0), (10, 30.0), (40, 500.0), (6, 0.0)])
def test_vmf_moments_match_bessel_functions(d, kappa):
    mu = torch.zeros(d, dtype=F64)
    mu[-1] = 1
    theta = vmf_directions(mu, kappa, 40_000, seed=d)
    assert torch.allclose(theta.norm(dim=-1), torch.ones(40_000, dtype=F64))
    cos = theta @ mu
    expected = bessel_ratio(d, kappa) if kappa > 0 else 0.0
    assert abs(float(cos.mean()) - expected) < 5 * float(cos.std()) / math.sqrt(40_000)
    # The component orthogonal to μ is isotropic: its mean vanishes.
    assert float(theta[:, :-1].mean(0).abs().max()) < 5 / math.sqrt(40_000)


def test_vmf_on_the_circle_s0_and_batched_means():
    plus = vmf_directions(torch.tensor([1.0], dtype=F64), 1.0, 50_000, seed=0)
    share = float((plus > 0).double().mean())
    assert share == pytest.approx(math.exp(1) / (math.exp(1) + math.exp(-1)), abs=0.01)
    means = torch.eye(3, dtype=F64)
    draws = vmf_directions(means, 50.0, 500, seed=1)
    assert draws.shape == (3, 500, 3)
    for i in range(3):
        assert float(draws[i].mean(0) @ means[i]) > 0.95


def test_distributional_sw_of_a_translation_matches_its_closed_form():
    """For y = x + c, E_{θ~vMF(ε,κ)} (θᵀc)² = cᵀ E[θθᵀ] c with E[θθᵀ] = (A/κ) I +
    (1 − dA/κ) εεᵀ, maximal at ε = c/‖c‖: v-DSW_2 = ‖c‖ √(1 − (d−1) A_d(κ)/κ)."""
    d, kappa = 8, 20.0
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, d, generator=gen, dtype=F64)
    c = torch.randn(d, generator=gen, dtype=F64)
    value, stderr, location = distributional_sliced_wasserstein(
        x, x + c, kappa=kappa, projections=2000, steps=60, seed=0, return_stderr=True,
        return_direction=True)
    truth = float(c.norm()) * math.sqrt(1 - (d - 1) * bessel_ratio(d, kappa) / kappa)
    assert abs(float(value) - truth) < 5 * float(stderr)
    assert abs(float(location @ c) / float(c.norm())) > 0.999


def test_distributional_sw_with_exactly_equal_means_matches_its_closed_form():
    """y = x/2 with x of exactly zero mean: Δm = 0, so the start is e₁ (the fallback for
    Δm/‖Δm‖), where a Householder reflection from e₁ had zero gradient and the ascent never
    moved. W_2²(θ#μ, θ#ν) = ¼ θᵀMθ (M = XᵀX/n), so E_{vMF(ε,κ)} = ¼[(A/κ) tr M +
    (1 − dA/κ) εᵀMε], maximal at the top eigenvector of M:
    v-DSW_2² = ¼[(A/κ) tr M + (1 − dA/κ) λ_max(M)]."""
    d, kappa, n = 5, 20.0, 128
    gen = torch.Generator().manual_seed(5)
    scale = torch.tensor([3.0, 4.0, 1.0, 1.0, 1.0], dtype=F64)
    x = torch.round(torch.randn(n, d, generator=gen, dtype=F64) * scale)
    x[-1] -= x.sum(0)                       # integer columns summing to 0: mean exactly 0
    y = x / 2
    assert torch.equal(x.mean(0), y.mean(0))
    moment = x.T @ x / n
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    a = bessel_ratio(d, kappa)
    truth = 0.5 * math.sqrt(a / kappa * float(moment.trace())
                            + (1 - d * a / kappa) * float(eigenvalues[-1]))
    value, stderr, location = distributional_sliced_wasserstein(
        x, y, kappa=kappa, projections=2000, steps=60, seed=0, init_draws=1,
        return_stderr=True, return_direction=True)
    assert abs(float(location @ eigenvectors[:, -1])) > 0.99
    assert abs(float(value) - truth) < 5 * float(stderr)


def test_moving_the_vmf_axis_is_smooth_at_its_start():
    """The map carrying samples around e₁ to samples around μ is differentiable at μ = e₁
    (finite differences agree), and sends e₁ to μ."""
    from ridgeline.transport.vmf import householder_to

    base = random_directions(4, 6, seed=2, dtype=F64)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64, requires_grad=True)

    def carried(mu):
        return householder_to(base, mu / mu.norm())

    assert torch.autograd.gradcheck(carried, (e1,))
    mu = torch.tensor([0.1, -0.7, 0.2, 0.4], dtype=F64)
    mu = mu / mu.norm()
    moved = householder_to(torch.eye(4, dtype=F64), mu)
    torch.testing.assert_close(moved[0], mu)
    torch.testing.assert_close(moved @ moved.T, torch.eye(4, dtype=F64))  # orthogonal


def test_distributional_sw_lies_between_sw_and_max_sw():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 10, generator=gen, dtype=F64)
    y = torch.randn(300, 10, generator=gen, dtype=F64) * torch.linspace(0.5, 3, 10, dtype=F64)
    sw = float(sliced_wasserstein(x, y, projections=2000, seed=0))
    msw = float(max_sliced_wasserstein(x, y, seed=0))
    values = [float(distributional_sliced_wasserstein(x, y, kappa=k, projections=500, seed=0))
              for k in (1.0, 50.0, 5000.0)]
    assert sw * 0.95 < values[0] < values[1] < values[2] <= msw * 1.001
    assert values[2] == pytest.approx(msw, rel=0.02)


def test_bad_options_raise_clear_errors():
    x, y = torch.randn(10, 3), torch.randn(12, 3)
    with pytest.raises(ConfigError, match="kappa"):
        distributional_sliced_wasserstein(x, y, kappa=-1.0)
    with pytest.raises(ConfigError, match="steps"):
        max_sliced_wasserstein(x, y, steps=0)
    with pytest.raises(ShapeMismatchError):
        max_sliced_wasserstein(x, torch.randn(5, 2))
    with pytest.raises(ConfigError, match="non-zero"):
        vmf_directions(torch.zeros(3), 1.0, 5)
    with pytest.raises(ConfigError, match="positive integer"):
        vmf_directions(np.ones(3), 1.0, 0)
