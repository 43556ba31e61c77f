"""ridgeline.train(optimizer="sam"|"asam"|"saf"|"mesa"): wiring, exact reductions, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ridgeline
from ridgeline.errors import ConfigError, NonFiniteLossError
from ridgeline.optim import SAM, TrajectoryLoss
from ridgeline.optim.methods import SAFStep, SAMStep, _PenaltyStep
from ridgeline.train import BackpropStep


def _net(seed: int = 0, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 16)] + ([nn.BatchNorm1d(16)] if norm else []) + [nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def _data(n: int = 50):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method,options", [("sam", {"rho": 0.0}), ("asam", {"rho": 0.0}),
                                            ("saf", {"weight": 0.0, "start_epoch": 1, "lag": 1}),
                                            ("mesa", {"weight": 0.0, "start_epoch": 1})])
def test_method_with_zero_strength_is_exactly_sgd(method, options):
    ref, net = _net(), _net()
    kw = dict(epochs=3, batch_size=16, lr=0.1, momentum=0.9, progress=False, seed=3)
    ridgeline.train(ref, _data(), optimizer="sgd", **kw)
    result = ridgeline.train(net, _data(), optimizer=method, **kw, **options)
    for a, b in zip(_params(ref), _params(net)):
        assert torch.equal(a, b)
    assert result.config["optimizer"] == method


# SAF's and MESA's terms are on after start_epoch counted from 0 (the authors' rule): epochs
# 2 and 3 here
_OPTIONS = {"sam": {}, "asam": {}, "saf": {"lag": 1, "start_epoch": 0}, "mesa": {"start_epoch": 0}}


@pytest.mark.parametrize("method", ["sam", "asam", "saf", "mesa"])
def test_methods_train_and_describe_themselves(method):
    net = _net(1)
    data = _data()
    result = ridgeline.train(net, data, optimizer=method, epochs=3, batch_size=10, lr=0.05,
                             progress=False, **_OPTIONS[method])
    assert result.steps == 15
    assert result.final["train_loss"] < result.history[0]["train_loss"]
    described = result.method
    assert described["optimizer"] == "SGD"
    if method in ("sam", "asam"):
        assert described["rho"] == (0.05 if method == "sam" else 2.0)
    params = 8 * 16 + 16 + 16 * 4 + 4
    expected = {"sam": 4 * params, "asam": 4 * params, "mesa": 4 * params,
                "saf": 2 * 50 * 4 * 2}  # θ copy, θ copy, teacher, (lag+1)·N·O float16
    assert described["memory_bytes"] == expected[method]


class _RecordingSAF(SAFStep):
    """SAFStep that remembers (epoch, indices, outputs) of every step."""

    seen: list

    def step(self, inputs, targets, indices, epoch):
        loss, outputs = super().step(inputs, targets, indices, epoch)
        self.seen.append((epoch, indices.clone(), outputs))
        return loss, outputs


def test_saf_through_the_trainer_stores_each_example_under_its_shuffled_index():
    net = _net(2)
    saf = TrajectoryLoss(50, 4, lag=2, start_epoch=1, dtype=torch.float32)
    rule = _RecordingSAF(net, torch.optim.SGD(net.parameters(), lr=0.05),
                         nn.functional.cross_entropy, saf)
    rule.seen = []
    ridgeline.train(net, _data(), optimizer=rule, epochs=2, batch_size=16, progress=False, seed=5)
    assert len(rule.seen) == 8
    for epoch, idx, out in rule.seen:
        torch.testing.assert_close(saf.stored_logits(idx, epoch), out, rtol=0, atol=0)
    first = torch.cat([idx for epoch, idx, _ in rule.seen if epoch == 1])
    assert sorted(first.tolist()) == list(range(50))
    assert not torch.equal(first, torch.arange(50))  # the batches really were shuffled


def test_saf_step_makes_the_update_of_backpropagating_loss_plus_term():
    """The "saf" rule feeds the term's closed-form gradient as a second backward root; the
    weights must follow the plain (loss + saf(outputs, indices, epoch)).backward() rule."""
    nets = [_net(6).double(), _net(6).double()]
    plain = _net(6).double()
    sgd = BackpropStep(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9),
                       nn.functional.cross_entropy)
    rules = [SAFStep(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                     nn.functional.cross_entropy,
                     TrajectoryLoss(50, 4, lag=1, start_epoch=0, weight=0.5, dtype=torch.float64))
             for net in nets]
    x, y = _data()
    x = x.double()
    gen = torch.Generator().manual_seed(4)
    for epoch in range(1, 5):
        order = torch.randperm(50, generator=gen)
        for start in range(0, 50, 10):
            idx = order[start:start + 10]
            rules[0].step(x[idx], y[idx], idx, epoch)
            _PenaltyStep.step(rules[1], x[idx], y[idx], idx, epoch)
            sgd.step(x[idx], y[idx], idx, epoch)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the term was on: both differ from plain SGD on the same batches
    assert max(float((a - b).detach().abs().max()) for a, b in zip(nets[0].parameters(),
                                                          plain.parameters())) > 1e-4


def test_sam_step_updates_batchnorm_statistics_once():
    net = _net(3, norm=True)
    x, y = _data(32)
    reference = copy.deepcopy(net).train()
    with torch.no_grad():
        reference(x)
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    net.train()
    SAMStep(net, sam, nn.functional.cross_entropy).step(x, y, torch.arange(32), 1)
    torch.testing.assert_close(net[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(net[1].running_var, reference[1].running_var, rtol=0, atol=0)
    assert int(net[1].num_batches_tracked) == 1


def test_sam_step_nonfinite_loss_at_perturbed_point_restores_theta_and_raises():
    net = _net(4)
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        value = nn.functional.cross_entropy(outputs, targets)
        return value * float("nan") if len(calls) == 2 else value

    before = _params(net)
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(NonFiniteLossError, match="θ \\+ ε"):
        SAMStep(net, sam, loss_fn).step(*_data(8), torch.arange(8), 1)
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)


def test_scheduler_acts_on_sam_base_optimizer_without_warnings():
    net = _net(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ridgeline.train(net, _data(), optimizer="sam", scheduler="linear", epochs=2,
                                 batch_size=25, progress=False)
    assert result.steps == 4


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="saf"):
        ridgeline.train(_net(), _data(), optimizer="saf", rho=0.1, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="dtype"):
        ridgeline.train(_net(), _data(), optimizer="saf", dtype="int8", epochs=1, progress=False)


def test_cli_trains_with_saf(tmp_path):
    from typer.testing import CliRunner

    from ridgeline.cli import app

    out = tmp_path / "saf.safetensors"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--optimizer", "saf",
                                      "--epochs", "2", "--widths", "16", "--option", "lag=1",
                                      "--option", "start_epoch=0"])
    assert result.exit_code == 0, result.output
    assert out.exists() and "test accuracy" in result.output


def test_forward_gradient_optimizer_is_reexported_lazily():
    training = pytest.importorskip("ridgeline.gradients.training")
    import ridgeline.optim

    assert ridgeline.optim.ForwardGradientSGD is training.ForwardGradientSGD
    with pytest.raises(AttributeError):
        ridgeline.optim.NoSuchOptimizer  # noqa: B018
