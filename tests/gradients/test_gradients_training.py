"""Training with forward gradients: the step rule, the registered method, options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import ridgeline
from ridgeline.errors import ConfigError
from ridgeline.gradients import CallableGuess, ForwardGradientSGD
from ridgeline.models import mlp

pytestmark = pytest.mark.filterwarnings("ignore:the auxiliary heads cost")


@pytest.fixture
def blobs():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=gen) * 2
    y = torch.randint(0, 4, (300,), generator=gen)
    x = centers[y] + torch.randn(300, 10, generator=gen)
    return x, y


def test_step_with_exact_gradient_guess_is_an_sgd_step(blobs):
    """Guess = the batch gradient ⇒ ĝ = g, so the update is exactly a backprop SGD step."""
    x, y = blobs[0][:64], blobs[1][:64]
    torch.manual_seed(0)
    model = mlp(10, [16], 4).double()
    twin = copy.deepcopy(model)
    rule = ForwardGradientSGD(model, lr=0.1, momentum=0.9,
                              guess=CallableGuess(lambda objective, params: objective.grad(params)))
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    xd = x.double()
    for _ in range(3):
        rule.step(xd, y)
        opt.zero_grad()
        F.cross_entropy(twin(xd), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_train_with_local_forward_gradients_learns(blobs):
    torch.manual_seed(0)
    model = mlp(10, [32, 32], 4)
    result = ridgeline.train(model, blobs, gradient="forward", optimizer="sgd", guess="local",
                             lr=0.05, epochs=3, batch_size=32, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < 0.7 * first["train_loss"]
    assert last["train_accuracy"] > 0.8
    assert result.method["rule"] == "ForwardGradientSGD" and result.method["guess"] == "local"
    assert result.method["jvps"] == 3 * 10 * 3  # 3 blocks × 10 steps × 3 epochs
    assert result.config["gradient"] == "forward" and result.config["guess"] == "local"


def test_random_guess_training_is_seeded_and_moves_the_loss(blobs):
    def run(seed):
        torch.manual_seed(0)
        model = mlp(10, [16], 4)
        result = ridgeline.train(model, blobs, gradient="forward", guess="random", num_guesses=4,
                                 combine="span", lr=0.01, momentum=0.0, epochs=2, batch_size=50,
                                 seed=seed, progress=False)
        return model, result

    a, ra = run(1)
    b, _ = run(1)
    c, _ = run(2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert ra.history[-1]["train_loss"] < ra.history[0]["train_loss"]


@pytest.mark.parametrize("guess", ["rademacher", "local"])
def test_batchnorm_running_statistics_are_updated(blobs, guess):
    torch.manual_seed(0)
    model = mlp(10, [16], 4, norm="batch")
    before = model[2].running_mean.clone()
    ridgeline.train(model, blobs, gradient="forward", optimizer="adam", guess=guess,
                    lr=1e-3, epochs=1, batch_size=100, progress=False)
    assert not torch.equal(before, model[2].running_mean)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_forward_training_rejects_bad_options(blobs):
    model = mlp(10, [8], 4)
    with pytest.raises(ConfigError, match="guess"):
        ridgeline.train(model, blobs, gradient="forward", guess="psychic", epochs=1, progress=False)
    with pytest.raises(ConfigError, match="base optimizer"):
        ridgeline.train(model, blobs, gradient="forward", optimizer="sam", epochs=1, progress=False)
    with pytest.raises(ConfigError, match="num_guesses"):
        ridgeline.train(model, blobs, gradient="forward", num_guesses=0, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="bad options"):
        ridgeline.train(model, blobs, gradient="forward", temperature=2.0, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="combine"):
        ForwardGradientSGD(model, combine="max")
