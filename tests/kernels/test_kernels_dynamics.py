"""predict_gd against the matrix exponential (scipy) and against real gradient descent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ridgeline.errors import ConfigError, DataError, ShapeMismatchError
from ridgeline.kernels import empirical_ntk, predict_gd


def _psd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n + 3, generator=gen, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def _expm_reference(k, y, f0, lr, t, kx=None, g0=None, *, examples=None):
    """f_t(X) = Y + expm(−ηΘt/N)(f0 − Y); f_t(x*) = g0 + Θ(x*,X) Θ⁻¹ (I − expm(·))(Y − f0),
    N the number of examples (the loss is a mean over examples, not over outputs)."""
    k, y, f0 = k.numpy(), y.numpy(), f0.numpy()
    e = scipy.linalg.expm(-lr * k * t / (examples or k.shape[0]))
    train = y + e @ (f0 - y)
    if kx is None:
        return train
    test = g0.numpy() + kx.numpy() @ np.linalg.solve(k, (np.eye(k.shape[0]) - e) @ (y - f0))
    return train, test


def test_matches_matrix_exponential_for_a_traced_kernel():
    k = _psd(8, 0)
    full = _psd(11, 1)  # a joint kernel on 8 train + 3 test points
    k, kx = full[:8, :8], full[8:, :8]
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    f0, g0 = torch.randn(8, 2, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)
    for t in (0.0, 3.0, 40.0):
        train, test = predict_gd(k, y, trace="mean", lr=0.7, t=t, f0_train=f0, k_test_train=kx, f0_test=g0)
        ref_train, ref_test = _expm_reference(k, y, f0, 0.7, t, kx, g0)
        np.testing.assert_allclose(train.numpy(), ref_train, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(test.numpy(), ref_test, rtol=1e-7, atol=1e-7)


def test_matches_matrix_exponential_for_a_full_kernel():
    """A (N, N, O, O) kernel couples the outputs: the flow runs on the (N·O, N·O) matrix."""
    n, o = 5, 3
    big = _psd(n * o + 2 * o, 3)  # rows ordered (example, output)
    full = big.reshape(n + 2, o, n + 2, o).permute(0, 2, 1, 3)
    k, kx = full[:n, :n], full[n:, :n]
    gen = torch.Generator().manual_seed(4)
    y, f0 = torch.randn(n, o, generator=gen, dtype=torch.float64), torch.randn(n, o, generator=gen, dtype=torch.float64)
    train, test = predict_gd(k, y, lr=0.5, t=[0.0, 5.0], f0_train=f0, k_test_train=kx)
    for index, t in enumerate((0.0, 5.0)):
        ref_train, ref_test = _expm_reference(big[: n * o, : n * o], y.reshape(-1, 1), f0.reshape(-1, 1),
                                              0.5, t, big[n * o:, : n * o], torch.zeros(2 * o, 1, dtype=torch.float64),
                                              examples=n)
        np.testing.assert_allclose(train[index].numpy(), ref_train.reshape(n, o), rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(test[index].numpy(), ref_test.reshape(2, o), rtol=1e-7, atol=1e-7)


def test_initial_outputs_at_zero_and_targets_at_infinity():
    k = _psd(6, 5)
    gen = torch.Generator().manual_seed(6)
    y, f0 = torch.randn(6, 2, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    kx, g0 = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    train, test = predict_gd(k, y, trace="mean", lr=1.0, t=[0.0, 1e7, math.inf], f0_train=f0, k_test_train=kx, f0_test=g0)
    torch.testing.assert_close(train[0], f0)
    torch.testing.assert_close(test[0], g0)
    torch.testing.assert_close(train[1], y, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(train[2], y, rtol=1e-10, atol=1e-10)
    # at t = inf the test outputs are kernel regression on the residual
    expected = g0 + kx @ torch.linalg.solve(k, y - f0)
    torch.testing.assert_close(test[2], expected, rtol=1e-8, atol=1e-8)


def test_singular_kernel_stays_finite_and_interpolates_its_range():
    k = _psd(6, 7, rank=3)  # rank 3
    y = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    kx = torch.randn(2, 3, dtype=torch.float64) @ torch.randn(3, 6, dtype=torch.float64)
    train, test = predict_gd(k, y, trace="mean", lr=1.0, t=math.inf, k_test_train=kx)
    assert bool(torch.isfinite(train).all()) and bool(torch.isfinite(test).all())
    projection = k @ torch.linalg.pinv(k)
    torch.testing.assert_close(train, projection @ y, rtol=1e-8, atol=1e-8)


def test_integer_labels_are_one_hot_and_vectors_are_one_column():
    k = _psd(5, 9)
    labels = torch.tensor([0, 2, 1, 2, 0])
    out = predict_gd(k, labels, trace="mean", lr=1.0, t=math.inf)
    torch.testing.assert_close(out, nn.functional.one_hot(labels, 3).double(), rtol=1e-8, atol=1e-8)
    assert predict_gd(k, torch.randn(5, dtype=torch.float64), trace="mean", lr=1.0, t=2.0).shape == (5, 1)
    assert predict_gd(k, labels, trace="mean", lr=1.0, t=[1.0, 2.0, 3.0]).shape == (3, 5, 3)


def test_tracks_gradient_descent_of_a_model_linear_in_its_parameters():
    """For f(x) = W φ(x) + b the NTK is constant, so gradient descent on the mse loss with
    a small step follows the gradient-flow prediction (train and test)."""
    torch.manual_seed(10)
    features = nn.Sequential(nn.Linear(3, 16), nn.Tanh()).double().requires_grad_(False)
    head = nn.Linear(16, 2).double()
    model = nn.Sequential(features, head)
    x, x_test = torch.randn(12, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(12, 2, dtype=torch.float64)
    k = empirical_ntk(model, x, trace=None)
    kx = empirical_ntk(model, x_test, x, trace=None)
    with torch.no_grad():
        f0, g0 = model(x), model(x_test)
    lr, steps = 0.02, 400
    optimizer = torch.optim.SGD(head.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        optimizer.step()
    train, test = predict_gd(k, y, lr=lr, t=steps, f0_train=f0, k_test_train=kx, f0_test=g0)
    with torch.no_grad():
        moved = (model(x) - f0).norm()
        assert float((model(x) - train).norm() / moved) < 0.02
        assert float((model(x_test) - test).norm() / (model(x_test) - g0).norm()) < 0.02


def test_bad_arguments_are_refused():
    k = _psd(4, 11)
    y = torch.randn(4, 1, dtype=torch.float64)
    with pytest.raises(ShapeMismatchError, match="square"):
        predict_gd(k[:3], y, trace="mean", lr=1.0, t=1.0)
    with pytest.raises(ShapeMismatchError, match="one row per training example"):
        predict_gd(k, y[:3], trace="mean", lr=1.0, t=1.0)
    with pytest.raises(ConfigError, match="lr"):
        predict_gd(k, y, trace="mean", lr=0.0, t=1.0)
    with pytest.raises(ConfigError, match="t must be"):
        predict_gd(k, y, trace="mean", lr=1.0, t=-1.0)
    with pytest.raises(ShapeMismatchError, match="f0_train"):
        predict_gd(k, y, trace="mean", lr=1.0, t=1.0, f0_train=torch.zeros(3, 1))
    with pytest.raises(ShapeMismatchError, match="k_test_train"):
        predict_gd(k, y, trace="mean", lr=1.0, t=1.0, k_test_train=torch.zeros(2, 3))
    with pytest.raises(DataError, match="labels"):
        predict_gd(k, torch.tensor([0, 1, 5, -1]), trace="mean", lr=1.0, t=1.0)
    with pytest.raises(ConfigError, match="O times too fast"):
        predict_gd(k, y, lr=1.0, t=1.0)               # a traced kernel needs trace=
    with pytest.raises(ConfigError, match="trace"):
        predict_gd(k, y, lr=1.0, t=1.0, trace="max")
    with pytest.raises(ConfigError, match="full"):
        predict_gd(k.reshape(4, 4, 1, 1), y, lr=1.0, t=1.0, trace="sum")


def test_summed_kernel_follows_real_gradient_descent_with_several_outputs():
    """empirical_ntk's default trace='sum' adds the O = 3 per-output kernels. For a model
    linear in its parameters (f = W φ(x) + b) gradient descent follows the flow exactly in
    the small-step limit; predict_gd(trace='sum') must agree with it and with the full
    (N, N, O, O) kernel — taking the summed kernel as the per-output one ran 3× too fast."""
    torch.manual_seed(12)
    features = nn.Sequential(nn.Linear(3, 16), nn.Tanh()).double().requires_grad_(False)
    head = nn.Linear(16, 3).double()
    model = nn.Sequential(features, head)
    x, x_test = torch.randn(10, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(10, 3, dtype=torch.float64)
    summed, summed_x = empirical_ntk(model, x), empirical_ntk(model, x_test, x)
    full, full_x = empirical_ntk(model, x, trace=None), empirical_ntk(model, x_test, x, trace=None)
    with torch.no_grad():
        f0, g0 = model(x), model(x_test)
    lr, steps = 0.01, 300
    optimizer = torch.optim.SGD(head.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (model(x) - y).pow(2).sum(1).mean()).backward()
        optimizer.step()
    train, test = predict_gd(summed, y, lr=lr, t=steps, trace="sum", f0_train=f0,
                             k_test_train=summed_x, f0_test=g0)
    ref_train, ref_test = predict_gd(full, y, lr=lr, t=steps, f0_train=f0, k_test_train=full_x,
                                     f0_test=g0)
    torch.testing.assert_close(train, ref_train, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(test, ref_test, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        assert float((model(x) - train).norm() / (model(x) - f0).norm()) < 0.02
        assert float((model(x_test) - test).norm() / (model(x_test) - g0).norm()) < 0.02
    mean = predict_gd(summed / 3, y, lr=lr, t=steps, trace="mean", f0_train=f0)
    torch.testing.assert_close(mean, train, rtol=1e-12, atol=1e-12)
