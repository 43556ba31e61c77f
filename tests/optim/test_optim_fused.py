"""The fused cross-entropy + distillation-KL node against autograd of the written loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ridgeline.losses import cross_entropy as ridgeline_cross_entropy
from ridgeline.losses import mse
from ridgeline.optim import EMATeacherLoss, TrajectoryLoss
from ridgeline.optim.fused import (
    cross_entropy_distillation,
    cross_entropy_distillation_value_and_grad,
    fusable,
)
from ridgeline.optim.methods import MESAStep, SAFStep, _PenaltyStep

B, IN, OUT = 9, 5, 4


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 7), nn.Tanh(), nn.Linear(7, OUT)).double()


def _written_loss(outputs, targets, teacher, tau, weight, mask=None):
    """CE + λτ²·(1/B) Σ_i m_i KL(softmax(t_i/τ) ‖ softmax(f_i/τ)), as the papers write it."""
    p = F.softmax(teacher / tau, dim=1)
    kl = (p * (F.log_softmax(teacher / tau, dim=1) - F.log_softmax(outputs / tau, dim=1))).sum(1)
    if mask is not None:
        kl = kl * mask
    return F.cross_entropy(outputs, targets) + weight * tau ** 2 * kl.mean()


def _case(seed: int, ignored: bool, masked: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, OUT, (B,), generator=gen)
    teacher = 3 * torch.randn(B, OUT, generator=gen, dtype=torch.float64)
    if ignored:
        y[[1, 4]] = -100
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.float64) if masked else None
    return x, y, teacher, mask


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("ignored,masked", [(False, False), (True, False), (False, True),
                                            (True, True)])
def test_fused_gradient_equals_autograd_of_ce_plus_kl_on_a_tiny_float64_net(tau, ignored, masked):
    """Parameter gradients of the fused node = autograd of CE + λτ²·KL (float64), with
    ignored targets (−100) and examples without a teacher (mask 0); the value is the CE."""
    x, y, teacher, mask = _case(3, ignored, masked)
    net, ref = _net(), _net()
    expected_ce = F.cross_entropy(ref(x), y)
    _written_loss(ref(x), y, teacher, tau, 0.7, mask).backward()
    outputs = net(x)
    loss, grad = cross_entropy_distillation_value_and_grad(outputs, y, teacher, tau, weight=0.7,
                                                           mask=mask, workspace={})
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected_ce.detach(), rtol=1e-14, atol=0)
    outputs.backward(grad)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_autograd_function_scales_with_the_upstream_gradient(tau):
    """``cross_entropy_distillation`` as a loss: (c · value).backward() gives c × the gradient
    of CE + λτ²·KL, computed by autograd of the written loss."""
    x, y, teacher, _ = _case(4, False, False)
    f = _net(1)(x).detach().requires_grad_(True)
    (2.5 * cross_entropy_distillation(f, y, teacher, tau, weight=0.3)).backward()
    g = f.detach().clone().requires_grad_(True)
    (2.5 * _written_loss(g, y, teacher, tau, 0.3)).backward()
    torch.testing.assert_close(f.grad, g.grad, rtol=1e-12, atol=1e-16)


def test_float16_teacher_and_float32_logits_match_a_float64_reference():
    """A float16 stored teacher is converted exactly; float32 logits are computed in
    float32 (compared with the float64 written loss on the same rounded values)."""
    x, y, teacher, _ = _case(5, False, False)
    teacher16 = teacher.half()
    f32 = _net(2)(x).float().detach().requires_grad_(True)
    loss, grad = cross_entropy_distillation_value_and_grad(f32, y, teacher16, 5.0, weight=0.3)
    assert loss.dtype == grad.dtype == torch.float32
    f64 = f32.detach().double().requires_grad_(True)
    _written_loss(f64, y, teacher16.double(), 5.0, 0.3).backward()
    torch.testing.assert_close(grad.double(), f64.grad, rtol=0, atol=1e-7)


def test_workspace_results_equal_fresh_results_over_repeated_calls():
    ws: dict = {}
    for seed in range(3):
        x, y, teacher, _ = _case(10 + seed, False, False)
        f = _net(seed)(x).detach()
        fresh = cross_entropy_distillation_value_and_grad(f, y, teacher, 2.0, weight=0.5)
        kept = cross_entropy_distillation_value_and_grad(f, y, teacher, 2.0, weight=0.5,
                                                         workspace=ws)
        torch.testing.assert_close(kept[0], fresh[0], rtol=0, atol=0)
        torch.testing.assert_close(kept[1], fresh[1], rtol=0, atol=0)


def test_fusable_only_for_class_index_cross_entropy():
    f, y = torch.zeros(3, OUT), torch.tensor([0, 1, 2])
    assert fusable(F.cross_entropy, f, y) and fusable(ridgeline_cross_entropy, f, y)
    assert not fusable(mse, f, y)
    assert not fusable(F.cross_entropy, f, torch.full((3, OUT), 0.25))   # probabilities
    assert not fusable(F.cross_entropy, torch.zeros(3, 2, OUT), torch.zeros(3, 2).long())
    assert not fusable(lambda o, t: F.cross_entropy(o, t), f, y)          # unknown callable


def _data(n: int = 36):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, IN, generator=gen, dtype=torch.float64), torch.randint(0, OUT, (n,), generator=gen)


def _train_pair(make_rule, loss_fn, epochs: int = 4):
    """Train three copies on the same batches: the rule's own step, _PenaltyStep (autograd of
    loss + term) and plain SGD."""
    nets = [_net(8), _net(8), _net(8)]
    rules = [make_rule(net, loss_fn) for net in nets[:2]]
    sgd = torch.optim.SGD(nets[2].parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    gen = torch.Generator().manual_seed(9)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(36, generator=gen)
        for start in range(0, 36, 12):
            idx = order[start:start + 12]
            rules[0].step(x[idx], y[idx], idx, epoch)
            _PenaltyStep.step(rules[1], x[idx], y[idx], idx, epoch)
            sgd.zero_grad()
            loss_fn(nets[2](x[idx]), y[idx]).backward()
            sgd.step()
    return nets


def _assert_same_and_not_sgd(a, b, plain):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    # the term was on: the rule did not train like plain SGD on the same batches
    assert max(float((p - q).detach().abs().max())
               for p, q in zip(a.parameters(), plain.parameters())) > 1e-4


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, ridgeline_cross_entropy, mse])
def test_saf_step_fused_or_fallback_equals_autograd_of_loss_plus_term(loss_fn):
    """Cross-entropy takes the fused node, MSE the second-root fallback: both follow
    (loss + saf(outputs, indices, epoch)).backward() in float64."""
    def make(net, loss):
        return SAFStep(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loss,
                       TrajectoryLoss(36, OUT, lag=1, start_epoch=0, weight=0.5, temperature=2.0,
                                      dtype=torch.float64))
    _assert_same_and_not_sgd(*_train_pair(make, loss_fn))


def test_mesa_step_fused_equals_autograd_of_loss_plus_term():
    def make(net, loss):
        teacher = EMATeacherLoss(net, decay=0.9, weight=0.8, temperature=5.0, start_epoch=0)
        return MESAStep(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loss,
                        teacher)
    _assert_same_and_not_sgd(*_train_pair(make, F.cross_entropy))


def test_saf_step_with_ignored_targets_matches_the_written_loss():
    """Targets −100 through the "saf" rule: the fused node's general path."""
    net, ref = _net(11), copy.deepcopy(_net(11))
    saf = TrajectoryLoss(B, OUT, lag=1, start_epoch=0, weight=0.4, dtype=torch.float64)
    rule = SAFStep(net, torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, saf)
    x, y, _, _ = _case(12, True, False)
    idx = torch.arange(B)
    rule.step(x, y, idx, 1)                        # stores epoch 1's logits, no term
    teacher = saf.stored_logits(idx, 1).clone()
    ref.load_state_dict(net.state_dict())
    rule.step(x, y, idx, 2)
    _written_loss(ref(x), y, teacher, 5.0, 0.4).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
