"""Science checks in small: the lazy regime (the kernel approaches its limit and freezes as
width grows) and linearised dynamics (a wide network follows predict_gd)."""

from __future__ import annotations

import math

import torch

from ridgeline.kernels import drift, empirical_ntk, infinite_ntk, predict_gd, relative_error
from ridgeline.models import mlp


def _circle(n: int) -> torch.Tensor:
    angles = torch.linspace(-math.pi, math.pi, n + 1)[:-1]
    return torch.stack([torch.cos(angles), torch.sin(angles)], 1)


def _gd(net, x, y, steps: int, lr: float) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
        optimizer.step()


def test_kernel_approaches_the_limit_and_freezes_as_width_grows():
    """Jacot et al. §6 in small: circle inputs, ReLU, three hidden layers, β = 0.1."""
    grid, x_train = _circle(32), _circle(4) * 1.0
    y_train = (x_train[:, 0] * x_train[:, 1])[:, None]
    limit = infinite_ntk(grid, depth=3, bias_var=0.01)
    results = {}
    for width in (64, 1024):
        errors, drifts = [], []
        for seed in range(3):
            torch.manual_seed(seed)
            net = mlp(2, [width] * 3, 1, parameterization="ntk", bias_std=0.1)
            k0 = empirical_ntk(net, grid)
            _gd(net, x_train, y_train, steps=100, lr=1.0)
            errors.append(relative_error(k0, limit))
            drifts.append(drift(k0, empirical_ntk(net, grid)))
        results[width] = (sum(errors) / 3, sum(drifts) / 3)
    assert results[1024][0] < results[64][0] / 2
    assert results[1024][1] < results[64][1] / 10


def test_wide_network_follows_predict_gd_better_than_a_narrow_one():
    from ridgeline.data import mnist1d

    data = mnist1d("train")
    x = data.inputs[:64]
    y = torch.nn.functional.one_hot(data.targets[:64], 10).float()
    errors = {}
    for width in (32, 1024):
        torch.manual_seed(0)
        net = mlp(40, [width, width], 10, parameterization="ntk", weight_std=math.sqrt(2),
                  bias_std=0.1)
        k = empirical_ntk(net, x, trace=None)
        lr = 0.1 * x.shape[0] / float(torch.linalg.eigvalsh(
            k.permute(0, 2, 1, 3).reshape(640, 640)).max())
        with torch.no_grad():
            f0 = net(x)
        steps = 300
        predicted = predict_gd(k, y, lr=lr, t=steps, f0_train=f0)
        _gd(net, x, y, steps=steps, lr=lr)
        with torch.no_grad():
            f = net(x)
        errors[width] = float((f - predicted).norm() / (f - f0).norm())
    assert errors[1024] < 0.05
    assert errors[1024] < errors[32] / 2
