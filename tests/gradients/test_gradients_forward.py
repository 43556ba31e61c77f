"""forward_gradient against backprop, closed forms and numpy least squares."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ridgeline import Objective
from ridgeline.errors import (
    ArchitectureMismatchError,
    ConfigError,
    ShapeMismatchError,
    UnsupportedOperationError,
)
from ridgeline.gradients import ForwardGradient, ForwardGradientSGD, RandomGuess, forward_gradient


def backprop_grad(model, x, y):
    """∇L by plain autograd on the whole batch (the reference)."""
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return {name: g for (name, _), g in zip(model.named_parameters(), grads)}


def flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def test_directional_derivative_equals_backprop_dot(tiny_mlp, tiny_data):
    x, y = tiny_data
    fg = forward_gradient(tiny_mlp, (x, y), guess="random", num_guesses=3, seed=1)
    g = backprop_grad(tiny_mlp, x, y)
    names = list(g)
    assert fg.directional_derivatives.shape == (1, 3)
    for k in range(3):
        v = flat({n: fg.guesses[n][k] for n in names}, names)
        assert float(fg.directional_derivatives[0, k]) == pytest.approx(float(flat(g, names) @ v),
                                                                       rel=1e-10, abs=1e-12)
    assert fg.loss == pytest.approx(float(F.cross_entropy(tiny_mlp(x), y).detach()), rel=1e-12)


def test_guess_equal_to_true_gradient_gives_true_gradient(tiny_mlp, tiny_data):
    x, y = tiny_data
    g = backprop_grad(tiny_mlp, x, y)
    fg = forward_gradient(tiny_mlp, (x, y), guess={k: v.clone() for k, v in g.items()})
    for name in g:
        torch.testing.assert_close(fg.estimate[name], g[name], rtol=1e-10, atol=1e-12)


def test_guess_parallel_to_gradient_is_rescaled_to_it(tiny_mlp, tiny_data):
    x, y = tiny_data
    g = backprop_grad(tiny_mlp, x, y)
    fg = forward_gradient(tiny_mlp, (x, y), guess={k: -7.5 * v for k, v in g.items()})
    for name in g:
        torch.testing.assert_close(fg.estimate[name], g[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "rademacher"])
def test_random_estimator_is_unbiased(tiny_data, kind):
    """Mean of d·v over N draws → g; per coordinate Var[d v_i] ≤ ‖g‖² + g_i² (Gaussian:
    E[(g·v)² v_i²] = ‖g‖² + 2g_i²), so every coordinate lies within 5 standard errors."""
    x, y = tiny_data
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    n = 20000
    fg = forward_gradient(model, (x, y), guess=kind, num_guesses=n, seed=0)
    g = backprop_grad(model, x, y)
    names = list(g)
    est, true = flat(fg.estimate, names), flat(g, names)
    stderr = torch.sqrt((true.pow(2).sum() + true.pow(2)) / n)
    assert bool(((est - true).abs() <= 5 * stderr).all()), float(((est - true).abs() / stderr).max())
    # and the estimate is far better than one draw
    one = flat(forward_gradient(model, (x, y), guess=kind, seed=0).estimate, names)
    assert float((est - true).norm()) < 0.2 * float((one - true).norm())


def test_span_projection_equals_numpy_least_squares(tiny_mlp, tiny_data):
    x, y = tiny_data
    gen = torch.Generator().manual_seed(5)
    names = [n for n, _ in tiny_mlp.named_parameters()]
    guesses = {n: torch.randn(4, *p.shape, generator=gen, dtype=p.dtype)
               for n, p in tiny_mlp.named_parameters()}
    fg = forward_gradient(tiny_mlp, (x, y), guess=guesses, combine="span")
    g = flat(backprop_grad(tiny_mlp, x, y), names).detach().numpy()
    u = np.stack([flat({n: guesses[n][k] for n in names}, names).numpy() for k in range(4)])
    coef, *_ = np.linalg.lstsq(u.T, g, rcond=None)
    np.testing.assert_allclose(flat(fg.estimate, names).numpy(), u.T @ coef, rtol=1e-9, atol=1e-12)


def test_span_of_random_guesses_equals_least_squares(tiny_mlp, tiny_data):
    x, y = tiny_data
    names = [n for n, _ in tiny_mlp.named_parameters()]
    fg = forward_gradient(tiny_mlp, (x, y), guess="random", num_guesses=6, combine="span", seed=2)
    g = flat(backprop_grad(tiny_mlp, x, y), names).detach().numpy()
    u = np.stack([flat({n: fg.guesses[n][k] for n in names}, names).numpy() for k in range(6)])
    coef, *_ = np.linalg.lstsq(u.T, g, rcond=None)
    np.testing.assert_allclose(flat(fg.estimate, names).numpy(), u.T @ coef, rtol=1e-9, atol=1e-12)


def test_span_with_repeated_guesses_is_still_the_projection(tiny_mlp, tiny_data):
    """A rank-deficient Gram matrix (a guess given twice) uses the pseudo-inverse."""
    x, y = tiny_data
    names = [n for n, _ in tiny_mlp.named_parameters()]
    gen = torch.Generator().manual_seed(9)
    one = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in tiny_mlp.named_parameters()}
    twice = {n: torch.stack([one[n], 2 * one[n]]) for n in names}
    fg = forward_gradient(tiny_mlp, (x, y), guess=twice, combine="span")
    g, u = flat(backprop_grad(tiny_mlp, x, y), names), flat(one, names)
    expected = (g @ u) / (u @ u) * u
    torch.testing.assert_close(flat(fg.estimate, names), expected.detach(), rtol=1e-8, atol=1e-12)


def test_mean_of_informed_guesses_averages_projections(tiny_mlp, tiny_data):
    x, y = tiny_data
    names = [n for n, _ in tiny_mlp.named_parameters()]
    gen = torch.Generator().manual_seed(4)
    guesses = {n: torch.randn(3, *p.shape, generator=gen, dtype=p.dtype)
               for n, p in tiny_mlp.named_parameters()}
    fg = forward_gradient(tiny_mlp, (x, y), guess=guesses, combine="mean")
    g = flat(backprop_grad(tiny_mlp, x, y), names).detach()
    expected = sum((g @ u) / (u @ u) * u for u in
                   (flat({n: guesses[n][k] for n in names}, names) for k in range(3))) / 3
    torch.testing.assert_close(flat(fg.estimate, names), expected, rtol=1e-10, atol=1e-12)


def test_block_guesses_have_one_derivative_per_block(tiny_mlp, tiny_data):
    x, y = tiny_data
    names = [n for n, _ in tiny_mlp.named_parameters()]
    blocks = [names[:2], names[2:]]
    fg = forward_gradient(tiny_mlp, (x, y), guess=RandomGuess(blocks=blocks), num_guesses=2,
                          seed=0)
    g = backprop_grad(tiny_mlp, x, y)
    assert fg.directional_derivatives.shape == (2, 2)
    for b, block in enumerate(blocks):
        for k in range(2):
            expected = sum(float((g[n] * fg.guesses[n][k]).sum()) for n in block)
            assert float(fg.directional_derivatives[b, k]) == pytest.approx(expected, rel=1e-10)
        for n in block:  # ĝ_b = mean_k d_{b,k} v_{b,k}
            manual = sum(fg.directional_derivatives[b, k] * fg.guesses[n][k] for k in range(2)) / 2
            torch.testing.assert_close(fg.estimate[n], manual)


def test_batches_are_combined_exactly(tiny_mlp, tiny_data):
    """Uneven batches (23 = 5+5+5+5+3) give the single-batch directional derivatives."""
    x, y = tiny_data
    whole = forward_gradient(tiny_mlp, (x, y), num_guesses=3, seed=8)
    batched = forward_gradient(Objective(tiny_mlp, (x, y), batch_size=5), num_guesses=3, seed=8)
    torch.testing.assert_close(batched.directional_derivatives, whole.directional_derivatives)
    assert batched.loss == pytest.approx(whole.loss, rel=1e-12)


def test_chunked_and_unbatched_jvps_agree(tiny_mlp, tiny_data):
    x, y = tiny_data
    ref = forward_gradient(tiny_mlp, (x, y), num_guesses=5, seed=3)
    for chunk in (1, 2):
        other = forward_gradient(tiny_mlp, (x, y), num_guesses=5, seed=3, chunk_size=chunk)
        torch.testing.assert_close(other.directional_derivatives, ref.directional_derivatives)


def test_same_seed_same_estimate(tiny_mlp, tiny_data):
    a = forward_gradient(tiny_mlp, tiny_data, num_guesses=2, seed=11)
    b = forward_gradient(tiny_mlp, tiny_data, num_guesses=2, seed=11)
    c = forward_gradient(tiny_mlp, tiny_data, num_guesses=2, seed=12)
    assert torch.equal(a.directional_derivatives, b.directional_derivatives)
    assert not torch.equal(a.directional_derivatives, c.directional_derivatives)


def test_previous_guess_accumulates_the_gradient_subspace(tiny_mlp, tiny_data):
    """With combine='span', guess 'previous' projects on span(ĝ_prev, fresh v): at fixed θ
    the cosine with g can only grow from call to call."""
    from ridgeline.gradients import PreviousGuess

    x, y = tiny_data
    names = [n for n, _ in tiny_mlp.named_parameters()]
    g = flat(backprop_grad(tiny_mlp, x, y), names).detach()
    guess, gen, cosines = PreviousGuess(), torch.Generator().manual_seed(0), []
    for _ in range(15):
        est = flat(forward_gradient(tiny_mlp, (x, y), guess=guess, num_guesses=3,
                                    combine="span", seed=gen).estimate, names)
        cosines.append(float(est @ g / (est.norm() * g.norm())))
    assert all(b >= a - 1e-9 for a, b in zip(cosines, cosines[1:]))
    assert cosines[-1] > 2 * cosines[0]  # fresh directions keep adding gradient energy


def test_callable_guess_is_called_with_objective_and_params(tiny_mlp, tiny_data):
    x, y = tiny_data
    seen = {}

    def guess(objective, params):
        seen["n"] = objective.num_examples
        return objective.grad(params)

    fg = forward_gradient(tiny_mlp, (x, y), guess=guess)
    g = backprop_grad(tiny_mlp, x, y)
    assert seen["n"] == 23
    for n in g:
        torch.testing.assert_close(fg.estimate[n], g[n])


def test_result_is_json_safe_and_plots(tiny_mlp, tiny_data):
    fg = forward_gradient(tiny_mlp, tiny_data, num_guesses=2)
    assert isinstance(fg, ForwardGradient)
    data = fg.to_dict()
    json.dumps(data)
    assert data["num_guesses"] == 2 and data["num_jvps"] == 2
    assert data["estimate_norm"] == pytest.approx(float(fg.flat().norm()))
    ax = fg.plot()
    assert ax.get_ylabel()
    with pytest.raises(dataclasses.FrozenInstanceError):
        fg.loss = 0.0


# ------------------------------------------------------------------ no backward pass
class CountingTanh(torch.autograd.Function):
    """tanh with a forward-mode rule; counts how often its backward runs."""

    backward_calls = 0
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_output):
        CountingTanh.backward_calls += 1
        (out,) = ctx.saved_tensors
        return grad_output * (1 - out * out)

    @staticmethod
    def jvp(ctx, tangent):
        (out,) = ctx.saved_tensors
        return tangent * (1 - out * out)


class CountingTanhLayer(nn.Module):
    def forward(self, x):
        return CountingTanh.apply(x)


@pytest.fixture
def counting_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), CountingTanhLayer(), nn.Linear(6, 3)).double()


@pytest.fixture
def autograd_calls(monkeypatch):
    """Counts calls of torch.autograd.grad / backward (torch.func.grad goes through them)."""
    calls = {"n": 0}
    for name in ("grad", "backward"):
        original = getattr(torch.autograd, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, name, counted)
    return calls


def test_no_backward_pass_through_the_network(counting_model, tiny_data, autograd_calls):
    x, y = tiny_data
    CountingTanh.backward_calls = 0
    fg = forward_gradient(counting_model, (x, y), num_guesses=4, seed=0)
    assert CountingTanh.backward_calls == 0 and autograd_calls["n"] == 0
    with torch.no_grad():  # works with autograd switched off entirely
        again = forward_gradient(counting_model, (x, y), num_guesses=4, seed=0)
    torch.testing.assert_close(again.directional_derivatives, fg.directional_derivatives)
    # the reference does run backward, and agrees
    g = Objective(counting_model, (x, y)).grad()
    assert CountingTanh.backward_calls > 0
    names = list(g)
    v = flat({n: fg.guesses[n][0] for n in names}, names)
    assert float(fg.directional_derivatives[0, 0]) == pytest.approx(float(flat(g, names) @ v),
                                                                   rel=1e-10)


def test_forward_gradient_training_runs_no_backward(counting_model, tiny_data, autograd_calls):
    x, y = tiny_data
    CountingTanh.backward_calls = 0
    rule = ForwardGradientSGD(counting_model, lr=1e-3, guess="random", num_guesses=2)
    before = [p.detach().clone() for p in counting_model.parameters()]
    loss, outputs = rule.step(x, y)
    assert CountingTanh.backward_calls == 0 and autograd_calls["n"] == 0
    assert outputs.shape == (23, 3) and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, counting_model.parameters()))


# ------------------------------------------------------------------ bad input
def test_bad_num_guesses_and_combine(tiny_mlp, tiny_data):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="num_guesses"):
            forward_gradient(tiny_mlp, tiny_data, num_guesses=bad)
    with pytest.raises(ConfigError, match="combine"):
        forward_gradient(tiny_mlp, tiny_data, combine="median")
    with pytest.raises(ConfigError, match="unknown guess"):
        forward_gradient(tiny_mlp, tiny_data, guess="psychic")
    with pytest.raises(ConfigError, match="chunk_size"):
        forward_gradient(tiny_mlp, tiny_data, chunk_size=0)


def test_guess_of_wrong_shape_is_named(tiny_mlp, tiny_data):
    guess = {n: torch.zeros(p.shape, dtype=p.dtype) for n, p in tiny_mlp.named_parameters()}
    guess["1.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ShapeMismatchError, match=r"'1.weight' has shape \(3, 3\)"):
        forward_gradient(tiny_mlp, tiny_data, guess=guess)
    uneven = {n: torch.zeros(2 if i == 0 else 3, *p.shape, dtype=p.dtype)
              for i, (n, p) in enumerate(tiny_mlp.named_parameters())}
    with pytest.raises(ShapeMismatchError, match="same leading number"):
        forward_gradient(tiny_mlp, tiny_data, guess=uneven)
    missing = {n: torch.zeros(p.shape) for n, p in list(tiny_mlp.named_parameters())[:2]}
    with pytest.raises(ArchitectureMismatchError, match="missing"):
        forward_gradient(tiny_mlp, tiny_data, guess=missing)
    with pytest.raises(ShapeMismatchError, match="dict of tensors"):
        forward_gradient(tiny_mlp, tiny_data, guess=lambda objective, params: 3.0)


class PairwiseDistance(nn.Module):
    """An RBF-like layer built on torch.cdist, which has no forward-mode rule."""

    def __init__(self, features: int, centers: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(centers, features))

    def forward(self, x):
        return torch.cdist(x, self.centers)


def test_op_without_forward_mode_rule_is_named(tiny_data):
    x, y = tiny_data
    model = nn.Sequential(PairwiseDistance(5, 3)).double()
    with pytest.raises(UnsupportedOperationError, match="_cdist_forward") as info:
        forward_gradient(model, (x, y))
    assert "backprop" in str(info.value)


def test_custom_function_without_jvp_is_named(tiny_data):
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    class Layer(nn.Module):
        def forward(self, x):
            return NoJvp.apply(x)

    x, y = tiny_data
    model = nn.Sequential(nn.Linear(5, 3), Layer()).double()
    with pytest.raises(UnsupportedOperationError, match="autograd.Function"):
        forward_gradient(model, (x, y), chunk_size=1)
