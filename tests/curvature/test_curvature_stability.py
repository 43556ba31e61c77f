"""EdgeOfStability callback: records during training, thresholds, plots."""

from __future__ import annotations

import json

import pytest
import torch

import ridgeline
from ridgeline import curvature
from ridgeline.errors import ConfigError
from ridgeline.models import mlp

F64 = torch.float64


def _setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp(5, [6], 3, activation="tanh").double()
    x = torch.randn(24, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (24,), generator=gen)
    return model, x, y


def test_records_top_eigenvalue_every_k_steps_on_the_fixed_subset():
    model, x, y = _setup()
    subset = (x[:10], y[:10])
    eos = curvature.EdgeOfStability(subset=subset, every=2, k=2, momentum=None, tol=1e-8)
    ridgeline.train(model, (x, y), lr=0.1, momentum=0.9, epochs=2, batch_size=8,
                    callbacks=[eos], progress=False)
    assert eos.steps == [0, 2, 4, 6]
    final = curvature.top_eigenvalues(model, subset, k=2, tol=1e-8)
    assert eos.records[-1]["eigenvalues"] == pytest.approx(final.values.tolist(), rel=1e-8)
    assert eos.records[0]["threshold"] is None  # no learning rate known before the first step
    for record in eos.records[1:]:
        assert record["momentum"] == 0.9
        assert record["threshold"] == pytest.approx((2 + 2 * 0.9) / 0.1)
    assert len(eos.sharpness) == 4
    json.dumps(eos.to_dict())
    assert eos.plot() is not None


def test_fixed_learning_rate_gives_two_over_eta_and_int_subsets_need_data():
    model, x, y = _setup()
    eos = curvature.EdgeOfStability(data=(x, y), subset=8, every=3, lr=0.05)
    ridgeline.train(model, (x, y), lr=0.05, momentum=0.0, epochs=1, batch_size=8,
                    callbacks=[eos], progress=False)
    assert eos.inputs.shape[0] == 8
    assert all(r["threshold"] == pytest.approx(40.0) for r in eos.records)
    with pytest.raises(ConfigError, match="pass the training data"):
        curvature.EdgeOfStability(subset=100)
    with pytest.raises(ConfigError, match="every"):
        curvature.EdgeOfStability(subset=(x, y), every=0)


def test_default_reads_momentum_from_the_optimizer_train_uses():
    """train() defaults to heavy-ball β = 0.9, so the threshold is (2 + 2β)/η = 38 at
    η = 0.1, not 2/η = 20 (the default used to be momentum=0.0)."""
    model, x, y = _setup()
    eos = curvature.EdgeOfStability(subset=(x[:10], y[:10]), every=2, lr=0.1)
    ridgeline.train(model, (x, y), lr=0.1, epochs=1, batch_size=8, callbacks=[eos],
                    progress=False)
    assert len(eos.records) == 2
    for record in eos.records:  # the record before the first step included
        assert record["momentum"] == 0.9 and record["settings"] == "optimizer"
        assert record["optimizer"] == "SGD" and record["nesterov"] is False
        assert record["threshold"] == pytest.approx(38.0)


def test_nesterov_and_weight_decay_are_read_from_a_torch_optimizer():
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, nesterov=True,
                          weight_decay=0.01)
    eos = curvature.EdgeOfStability(subset=(x[:10], y[:10]), every=1)
    ridgeline.train(model, (x, y), optimizer=opt, epochs=1, batch_size=8, callbacks=[eos],
                    progress=False)
    last = eos.records[-1]
    assert last["nesterov"] is True and last["weight_decay"] == 0.01
    assert last["threshold"] == pytest.approx(3.0 / (0.1 * 2.0) - 0.01)
    adam = curvature.EdgeOfStability(subset=(x[:10], y[:10]), every=1)
    ridgeline.train(model, (x, y), optimizer="adam", lr=0.01, epochs=1, batch_size=8,
                    callbacks=[adam], progress=False)
    assert adam.records[-1]["optimizer"] == "Adam"
    assert adam.records[-1]["threshold"] is None  # no 2/η-type threshold for Adam
    given = curvature.EdgeOfStability(subset=(x[:10], y[:10]), every=1, momentum=0.0)
    ridgeline.train(model, (x, y), lr=0.1, epochs=1, batch_size=8, callbacks=[given],
                    progress=False)
    assert given.records[-1]["settings"] == "given"
    assert given.records[-1]["threshold"] == pytest.approx(20.0)


def _diverges(lam, lr, momentum, nesterov, dampening, weight_decay, steps=3000):
    """Run torch.optim.SGD itself on L(θ) = ½ λ θ² and report whether it blew up."""
    theta = torch.ones(1, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum, nesterov=nesterov,
                          dampening=dampening, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * theta.square()).sum().backward()
        opt.step()
    return float(theta.detach().abs()) > 1.0


@pytest.mark.parametrize("momentum, nesterov, dampening, weight_decay", [
    (0.0, False, 0.0, 0.0), (0.9, False, 0.0, 0.0), (0.9, True, 0.0, 0.0),
    (0.5, False, 0.3, 0.0), (0.9, False, 0.0, 0.5), (0.7, True, 0.0, 0.2)])
def test_threshold_separates_stable_from_divergent_torch_sgd_on_a_quadratic(
        momentum, nesterov, dampening, weight_decay):
    lr = 0.1
    bound = curvature.stability_threshold(lr, momentum, nesterov=nesterov,
                                          dampening=dampening, weight_decay=weight_decay)
    assert not _diverges(0.98 * bound, lr, momentum, nesterov, dampening, weight_decay)
    assert _diverges(1.02 * bound, lr, momentum, nesterov, dampening, weight_decay)


@pytest.mark.slow
def test_full_batch_gradient_descent_reaches_the_edge_of_stability():
    """Cohen et al. (2021): under full-batch GD the top Hessian eigenvalue rises until it
    reaches 2/η and then hovers around it."""
    from ridgeline.data import mnist1d

    data = mnist1d("train").subset(500)
    torch.manual_seed(0)
    model = mlp(40, [256, 256], 10)
    lr = 0.3
    eos = curvature.EdgeOfStability(subset=data, every=25, lr=lr, tol=1e-2)
    ridgeline.train(model, data, lr=lr, momentum=0.0, epochs=200, batch_size=500,
                    callbacks=[eos], progress=False)
    sharpness = eos.sharpness
    assert sharpness[0] < 0.5 * 2 / lr                 # starts well below the threshold
    assert max(sharpness) > 0.9 * 2 / lr               # progressive sharpening reaches it
    assert max(sharpness) < 1.5 * 2 / lr               # and hovers there instead of diverging
