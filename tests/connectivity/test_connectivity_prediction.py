"""Barrier prediction B̂ = ¼(gA−gB)·Δ + (ΔᵀHAΔ + ΔᵀHBΔ)/16, the mean of the two half-way
Taylor expansions: exact on quadratic and cubic losses along the path; its terms against the
explicit gradient and Hessian."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from ridgeline.connectivity import predict_barrier
from ridgeline.connectivity.prediction import directional_terms
from ridgeline.losses import mse
from ridgeline.models import mlp
from ridgeline.objective import Objective


def _linear_pair():
    torch.manual_seed(0)
    a = mlp(4, [], 3).double()
    torch.manual_seed(1)
    b = mlp(4, [], 3).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(25, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(25, 3, generator=gen, dtype=torch.float64)
    return a, b, x, y


def _flat_loss(model, x, y, loss):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            params[name] = theta[offset:offset + size].view(shape)
            offset += size
        return loss(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, flat


def _hand_midpoint(a, b, x, y, loss):
    f, theta_a = _flat_loss(a, x, y, loss)
    _, theta_b = _flat_loss(b, x, y, loss)
    return float(f(0.5 * (theta_a + theta_b)) - 0.5 * (f(theta_a) + f(theta_b))), f, theta_a, theta_b


def test_prediction_is_exact_on_a_quadratic_loss():
    a, b, x, y = _linear_pair()
    result = predict_barrier(a, b, (x, y), loss="mse", points=5)
    truth, f, theta_a, theta_b = _hand_midpoint(a, b, x, y, mse)
    delta = theta_b - theta_a
    hessian = torch.autograd.functional.hessian(f, theta_a)
    assert result.predicted == pytest.approx(truth, abs=1e-12)
    assert result.predicted == pytest.approx(float(-delta @ hessian @ delta / 8), abs=1e-12)
    assert result.measured_midpoint == pytest.approx(truth, abs=1e-12)
    assert result.measured == pytest.approx(0.0, abs=1e-12)  # convex: no barrier


def test_prediction_equals_the_measured_barrier_on_a_concave_quadratic():
    a, b, x, y = _linear_pair()

    def concave(out, target):
        return -mse(out, target)

    result = predict_barrier(a, b, (x, y), loss=concave, points=25)
    assert result.measured > 0  # the maximum sits at α = ½
    assert result.predicted == pytest.approx(result.measured, abs=1e-12)


def test_prediction_is_exact_when_the_loss_is_cubic_along_the_path():
    a, b, x, y = _linear_pair()

    def cubic(out, target):
        return (out ** 3).mean() + 0.5 * ((out - target) ** 2).mean()

    result = predict_barrier(a, b, (x, y), loss=cubic, points=5)
    truth, *_ = _hand_midpoint(a, b, x, y, cubic)
    assert result.predicted == pytest.approx(truth, abs=1e-12)
    assert result.measured_midpoint == pytest.approx(truth, abs=1e-12)


def _half_way_taylor(f, theta_a, theta_b):
    """The two second-order Taylor expansions of f, from θA and from θB, at the midpoint,
    from the explicit gradient and Hessian; and the gradients at both ends."""
    delta = theta_b - theta_a
    g_a = torch.autograd.functional.jacobian(f, theta_a)
    g_b = torch.autograd.functional.jacobian(f, theta_b)
    h_a = torch.autograd.functional.hessian(f, theta_a)
    h_b = torch.autograd.functional.hessian(f, theta_b)
    from_a = float(f(theta_a) + 0.5 * g_a @ delta + delta @ h_a @ delta / 8)
    from_b = float(f(theta_b) - 0.5 * g_b @ delta + delta @ h_b @ delta / 8)
    return from_a, from_b, g_a, g_b


def test_prediction_is_the_mean_of_the_two_half_way_taylor_expansions_not_the_hermite_midpoint():
    a, b, x, y = _tanh_pair()  # cross-entropy on a tanh net: no polynomial along the path
    result = predict_barrier(a, b, (x, y), points=5)
    truth, f, theta_a, theta_b = _hand_midpoint(a, b, x, y, F.cross_entropy)
    from_a, from_b, g_a, g_b = _half_way_taylor(f, theta_a, theta_b)
    ends = 0.5 * float(f(theta_a) + f(theta_b))
    assert result.predicted == pytest.approx(0.5 * (from_a + from_b) - ends, abs=1e-10)
    hermite = float((g_a - g_b) @ (theta_b - theta_a) / 8)  # cubic Hermite midpoint barrier
    assert abs(result.predicted - hermite) > 1e-3
    assert "mean of the second-order Taylor expansions" in result.predictor
    assert "Hermite" not in result.predictor.split(";")[0]
    assert result.to_dict()["predictor"] == result.predictor


def test_mean_of_the_half_way_expansions_is_exact_on_a_cubic_in_alpha_loss():
    a, b, x, y = _linear_pair()  # a linear model: the loss below is a cubic in α

    def cubic(out, target):
        return (out ** 3).mean() + 0.5 * ((out - target) ** 2).mean()

    result = predict_barrier(a, b, (x, y), loss=cubic, points=5)
    truth, f, theta_a, theta_b = _hand_midpoint(a, b, x, y, cubic)
    from_a, from_b, _, _ = _half_way_taylor(f, theta_a, theta_b)
    midpoint = float(f(0.5 * (theta_a + theta_b)))
    # each expansion alone misses by its third-order term ±f‴/48; the mean is exact
    assert abs(from_a - midpoint) > 1e-3 and abs(from_b - midpoint) > 1e-3
    assert from_a - midpoint == pytest.approx(-(from_b - midpoint), abs=1e-10)
    assert result.predicted == pytest.approx(truth, abs=1e-12)


def _tanh_pair():
    torch.manual_seed(4)
    a = mlp(3, [4], 2, activation="tanh").double()
    torch.manual_seed(5)
    b = mlp(3, [4], 2, activation="tanh").double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(17, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (17,), generator=gen)
    return a, b, x, y


def test_directional_terms_match_the_explicit_gradient_and_hessian():
    a, b, x, y = _tanh_pair()
    f, theta_a = _flat_loss(a, x, y, F.cross_entropy)
    _, theta_b = _flat_loss(b, x, y, F.cross_entropy)
    delta = theta_b - theta_a
    objective = Objective(a, (x, y), batch_size=5)  # uneven batches: size-weighted
    params = {k: v.detach() for k, v in a.named_parameters()}
    delta_dict = {k: b.get_parameter(k).detach() - v for k, v in params.items()}
    terms = directional_terms(objective, params, {}, delta_dict)
    grad = torch.autograd.functional.jacobian(f, theta_a)
    hessian = torch.autograd.functional.hessian(f, theta_a)
    assert terms["loss"] == pytest.approx(float(f(theta_a)), abs=1e-12)
    assert terms["g_delta"] == pytest.approx(float(grad @ delta), abs=1e-12)
    assert terms["delta_h_delta"] == pytest.approx(float(delta @ hessian @ delta), abs=1e-10)


def test_layerwise_prediction_uses_the_hybrid_end_and_reports_spearman():
    from scipy.stats import spearmanr

    a, b, x, y = _tanh_pair()
    result = predict_barrier(a, b, (x, y), layerwise=True, layers="tensor", points=9)
    assert [r.layer for r in result.layers] == ["1.weight", "1.bias", "3.weight", "3.bias"]
    f, theta_a = _flat_loss(a, x, y, F.cross_entropy)
    _, theta_b = _flat_loss(b, x, y, F.cross_entropy)
    sizes = [p.numel() for p in a.parameters()]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    g_a = torch.autograd.functional.jacobian(f, theta_a)
    h_a = torch.autograd.functional.hessian(f, theta_a)
    for index, row in enumerate(result.layers):
        delta = torch.zeros_like(theta_a)
        lo, hi = bounds[index], bounds[index + 1]
        delta[lo:hi] = theta_b[lo:hi] - theta_a[lo:hi]
        theta_c = theta_a + delta
        g_c = torch.autograd.functional.jacobian(f, theta_c)
        h_c = torch.autograd.functional.hessian(f, theta_c)
        expected = float(0.25 * (g_a - g_c) @ delta + (delta @ h_a @ delta + delta @ h_c @ delta) / 16)
        assert row.predicted == pytest.approx(expected, abs=1e-10)
        midpoint = float(f(theta_a + 0.5 * delta) - 0.5 * (f(theta_a) + f(theta_c)))
        assert row.measured_midpoint == pytest.approx(midpoint, abs=1e-12)
    rho = spearmanr([r.predicted for r in result.layers], [r.measured for r in result.layers])
    if result.spearman is not None:
        assert result.spearman == pytest.approx(float(rho.statistic))
    json.dumps(result.to_dict())
    assert result.plot() is not None
