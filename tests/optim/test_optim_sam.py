"""SAM / ASAM against closed forms on a quadratic, and exact reductions to the base optimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ridgeline.errors import ConfigError, NonFiniteLossError
from ridgeline.optim import SAM, frozen_norm_stats


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀ A θ + bᵀ θ over θ = (w (3×2), c (4,)), flattened in that order."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
        m = torch.randn(10, 10, generator=gen, dtype=torch.float64)
        self.register_buffer("A", m @ m.T + torch.eye(10, dtype=torch.float64))
        self.register_buffer("b", torch.randn(10, generator=gen, dtype=torch.float64))

    def theta(self) -> torch.Tensor:
        return torch.cat([self.w.detach().reshape(-1), self.c.detach()])

    def grad_at(self, theta: torch.Tensor) -> torch.Tensor:  # closed form: A θ + b
        return self.A @ theta + self.b

    def loss(self) -> torch.Tensor:
        theta = torch.cat([self.w.reshape(-1), self.c])
        return 0.5 * theta @ self.A @ theta + self.b @ theta


def _first_step(model: Quadratic, **kw) -> torch.Tensor:
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, **kw)
    model.loss().backward()
    sam.first_step()
    return model.theta()


def test_sam_perturbation_equals_rho_g_over_norm_g():
    model = Quadratic()
    theta = model.theta()
    g = model.grad_at(theta)
    moved = _first_step(model, rho=0.3)
    torch.testing.assert_close(moved - theta, 0.3 * g / g.norm(), rtol=1e-12, atol=1e-12)


def test_asam_perturbation_equals_adaptive_form():
    model = Quadratic(seed=1)
    theta = model.theta()
    g = model.grad_at(theta)
    t = theta.abs()
    expected = 0.7 * t ** 2 * g / (t * g).norm()
    moved = _first_step(model, rho=0.7, adaptive=True)
    torch.testing.assert_close(moved - theta, expected, rtol=1e-12, atol=1e-12)


def test_asam_with_eta_uses_abs_theta_plus_eta():
    model = Quadratic(seed=2)
    theta = model.theta()
    g = model.grad_at(theta)
    t = theta.abs() + 0.01
    moved = _first_step(model, rho=0.5, adaptive=True, eta=0.01)
    torch.testing.assert_close(moved - theta, 0.5 * t ** 2 * g / (t * g).norm(),
                               rtol=1e-12, atol=1e-12)


def test_default_rho_is_005_for_sam_and_2_for_asam():
    model = Quadratic()
    assert SAM(model.parameters(), torch.optim.SGD, lr=0.1).param_groups[0]["rho"] == 0.05
    assert SAM(model.parameters(), torch.optim.SGD, adaptive=True, lr=0.1).param_groups[0]["rho"] == 2.0


def test_sam_step_descends_with_gradient_at_perturbed_point():
    model = Quadratic(seed=3)
    theta = model.theta()
    g = model.grad_at(theta)
    g_adv = model.grad_at(theta + 0.2 * g / g.norm())
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.05)

    def closure():
        loss = model.loss()
        loss.backward()
        return loss

    loss = sam.step(closure)
    torch.testing.assert_close(model.theta(), theta - 0.05 * g_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.detach(), 0.5 * theta @ model.A @ theta + model.b @ theta)


def _tiny_net(seed: int, norm=None) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if norm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                     (torch.optim.Adam, {"lr": 0.01})])
def test_rho_zero_reduces_exactly_to_base_optimizer(base, kw):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6, 16), generator=gen)
    net_sam, net_ref = _tiny_net(0), _tiny_net(0)
    sam = SAM(net_sam.parameters(), base, rho=0.0, **kw)
    ref = base(net_ref.parameters(), **kw)
    for xb, yb in zip(x, y):
        def closure(xb=xb, yb=yb):
            loss = nn.functional.cross_entropy(net_sam(xb), yb)
            loss.backward()
            return loss
        sam.step(closure)
        ref.zero_grad()
        nn.functional.cross_entropy(net_ref(xb), yb).backward()
        ref.step()
    for a, b in zip(net_sam.parameters(), net_ref.parameters()):
        assert torch.equal(a, b)


def test_batchnorm_running_stats_updated_once_per_step():
    net = _tiny_net(1, norm=True)
    reference = copy.deepcopy(net)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    reference.train()
    reference(x)  # one forward at θ: what the running statistics should become
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=net)
    net.train()

    def closure():
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    sam.step(closure)
    bn, bn_ref = net[1], reference[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 1


def test_frozen_norm_stats_restores_buffers():
    net = _tiny_net(2, norm=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "tracked" in k}
    with frozen_norm_stats(net):
        net(torch.randn(16, 5, dtype=torch.float64) * 3 + 1)
    for key, value in before.items():
        assert torch.equal(net.state_dict()[key], value)


def test_nonfinite_loss_in_ascent_raises_and_does_not_step():
    net = _tiny_net(3)
    before = [p.detach().clone() for p in net.parameters()]
    sam = SAM(net.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        loss = nn.functional.cross_entropy(net(torch.full((4, 5), float("nan"), dtype=torch.float64)), torch.zeros(4, dtype=torch.long))
        loss.backward()
        return loss

    with pytest.raises(NonFiniteLossError, match="ascent"):
        sam.step(closure)
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_gradient_first_step_raises_or_skips():
    net = _tiny_net(4)
    sam = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    for p in net.parameters():
        p.grad = torch.full_like(p, float("inf"))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(NonFiniteLossError):
        sam.first_step()
    assert sam.first_step(skip_nonfinite=True) is False
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)


def test_scheduler_on_base_optimizer_changes_shared_lr_without_warning():
    net = _tiny_net(5)
    sam = SAM(net.parameters(), torch.optim.SGD, lr=1.0)
    assert sam.param_groups is sam.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(sam.base_optimizer, lambda s: 0.5 ** s)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            nn.functional.cross_entropy(net(x), y).backward()
            sam.first_step(zero_grad=True)
            nn.functional.cross_entropy(net(x), y).backward()
            sam.second_step(zero_grad=True)
            sched.step()
    assert sam.param_groups[0]["lr"] == 0.25


def test_grad_scaler_pattern_matches_unscaled_step_and_skips_overflow():
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    nets = [_tiny_net(6), _tiny_net(6)]
    sams = [SAM(n.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9) for n in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    net, sam = nets[0], sams[0]
    scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
    scaler.unscale_(sam)
    assert sam.first_step(zero_grad=True, skip_nonfinite=True)
    scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
    sam.second_step(zero_grad=True, scaler=scaler)
    scaler.update()

    def closure():
        loss = nn.functional.cross_entropy(nets[1](x), y)
        loss.backward()
        return loss

    sams[1].step(closure)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # an overflowing step: nothing moves and the scale shrinks
    before = [p.detach().clone() for p in net.parameters()]
    scale = scaler.get_scale()
    scaler.scale(nn.functional.cross_entropy(net(x), y) * float("inf")).backward()
    scaler.unscale_(sam)
    assert not sam.first_step(zero_grad=True, skip_nonfinite=True)
    sam.zero_grad()
    scaler.update()
    assert scaler.get_scale() < scale
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)


def test_base_optimizer_instance_equals_class_and_state_dict_round_trips():
    net_a, net_b = _tiny_net(7), _tiny_net(7)
    sam_a = SAM(net_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(net_b.parameters(), lr=0.1, momentum=0.9)
    sam_b = SAM(net_b.parameters(), base, rho=0.1)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    for net, sam in ((net_a, sam_a), (net_b, sam_b)):
        def closure(net=net):
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss
        sam.step(closure)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)
    state = sam_a.state_dict()
    assert state["param_groups"][0]["rho"] == 0.1
    sam_b.load_state_dict(state)
    assert sam_b.param_groups is sam_b.base_optimizer.param_groups
    assert sam_b.param_groups[0]["rho"] == 0.1


def test_bad_arguments_raise_config_errors():
    net = _tiny_net(8)
    with pytest.raises(ConfigError, match="rho"):
        SAM(net.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(ConfigError, match="base_optimizer"):
        SAM(net.parameters(), "sgd", lr=0.1)
    other = torch.optim.SGD(_tiny_net(9).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="not the parameters"):
        SAM(net.parameters(), other)
    with pytest.raises(ConfigError, match="closure"):
        SAM(net.parameters(), torch.optim.SGD, lr=0.1).step()
