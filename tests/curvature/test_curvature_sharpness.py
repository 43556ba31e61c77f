"""Sharpness against closed forms on a quadratic loss, worst ≥ average, and the rescaling
invariance of adaptive sharpness."""

from __future__ import annotations

import json

import pytest
import torch
from torch.autograd.functional import hessian as explicit_hessian
from torch.func import functional_call

from ridgeline import curvature
from ridgeline.errors import ConfigError
from ridgeline.models import mlp

F64 = torch.float64


def _least_squares_minimum():
    """A linear model at the exact minimum of ½·mean‖Wx + b − y‖² (a quadratic in θ) and the
    explicit Hessian of that loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen, dtype=F64) * torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=F64)
    y = torch.randn(40, 2, generator=gen, dtype=F64)
    model = mlp(4, [], 2).double()
    design = torch.cat([x, torch.ones(40, 1, dtype=F64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution            # (5, 2)
    with torch.no_grad():
        model[-1].weight.copy_(solution[:4].T)
        model[-1].bias.copy_(solution[4])
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            params[name] = flat[offset:offset + size].view(shape)
            offset += size
        return 0.5 * (functional_call(model, params, (x,)) - y).pow(2).sum(dim=1).mean()

    return model, (x, y), theta, explicit_hessian(loss, theta)


@pytest.mark.parametrize("adaptive", [True, False])
def test_average_sharpness_of_a_quadratic_matches_its_closed_form(adaptive):
    model, data, theta, h = _least_squares_minimum()
    rho = 0.05
    scale = theta.abs() if adaptive else torch.ones_like(theta)
    expected = 0.5 * rho ** 2 * (h.diagonal() * scale ** 2).sum().item()  # ½ρ² tr(H diag(T²))
    result = curvature.sharpness(model, data, kind="average", rho=rho, adaptive=adaptive,
                                 samples=800, loss="mse", seed=1)
    assert abs(result.value - expected) <= 4 * result.stderr
    assert result.stderr < 0.1 * expected


def test_worst_case_l2_sharpness_at_a_minimum_is_half_rho_squared_lambda_max():
    model, data, _, h = _least_squares_minimum()
    rho = 0.1
    expected = 0.5 * rho ** 2 * torch.linalg.eigvalsh(h).max().item()
    result = curvature.sharpness(model, data, kind="worst", rho=rho, adaptive=False, norm=2,
                                 steps=30, loss="mse")
    assert 0.99 * expected <= result.value <= expected * (1 + 1e-9)
    assert result.history == tuple(sorted(result.history))  # best loss so far never decreases


def _classifier():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = mlp(6, [16], 3).double()
    x = torch.randn(60, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (60,), generator=gen)
    return model, (x, y)


def test_worst_case_exceeds_average_case_in_the_same_linf_ball():
    model, data = _classifier()
    worst = curvature.sharpness(model, data, kind="worst", rho=0.05, norm="inf")
    average = curvature.sharpness(model, data, kind="average", rho=0.05, norm="inf", samples=20)
    assert worst.value > 0 and worst.value >= max(average.history)


def test_adaptive_sharpness_is_invariant_to_rescaling_layers():
    model, data = _classifier()
    rescaled = mlp(6, [16], 3).double()
    rescaled.load_state_dict(model.state_dict())
    with torch.no_grad():                       # ReLU is positively homogeneous
        rescaled[1].weight.mul_(4.0)
        rescaled[1].bias.mul_(4.0)
        rescaled[3].weight.div_(4.0)
    for kind, norm in (("average", 2), ("worst", "inf")):
        one = curvature.sharpness(model, data, kind=kind, rho=0.02, norm=norm, seed=3)
        two = curvature.sharpness(rescaled, data, kind=kind, rho=0.02, norm=norm, seed=3)
        assert two.value == pytest.approx(one.value, rel=1e-6, abs=1e-12), kind
    plain_one = curvature.sharpness(model, data, kind="average", rho=0.02, adaptive=False, seed=3)
    plain_two = curvature.sharpness(rescaled, data, kind="average", rho=0.02, adaptive=False, seed=3)
    assert abs(plain_two.value - plain_one.value) > 0.05 * abs(plain_one.value)


def test_sharpness_bad_input_and_serialisation():
    model, data = _classifier()
    with pytest.raises(ConfigError, match="kind"):
        curvature.sharpness(model, data, kind="median", rho=0.1)
    with pytest.raises(ConfigError, match="norm"):
        curvature.sharpness(model, data, rho=0.1, norm=1)
    with pytest.raises(ConfigError, match="rho"):
        curvature.sharpness(model, data, rho=0.0)
    result = curvature.sharpness(model, data, kind="average", rho=0.01, samples=4)
    json.dumps(result.to_dict())
    assert result.plot() is not None and result.evaluations == 5
