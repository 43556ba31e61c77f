"""R-operator Hessian and Gauss–Newton products of feed-forward chains against explicit
matrices (torch.autograd.functional.hessian / jacobian of the flat parameter vector,
float64), and the autograd fallback for everything the chain path does not cover."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian as explicit_hessian
from torch.func import functional_call

from ridgeline import curvature
from ridgeline.curvature.feedforward import FeedForwardCurvature
from ridgeline.curvature.operators import _RecordedGradient
from ridgeline.losses import cross_entropy, mse
from ridgeline.models import mlp
from ridgeline.models.layers import Erf

F64 = torch.float64


def _data(n=19, shape=(5,), classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=gen, dtype=F64),
            torch.randint(0, classes, (n,), generator=gen))


def _explicit(model, x, y, loss, names=None):
    """∇²L over the parameters ``names`` (default all) with the others held fixed."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def objective(flat):
        values, offset = {k: v.detach() for k, v in params.items()}, 0
        for name, shape in zip(names, shapes):
            values[name] = flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
        return loss(functional_call(model, values, (x,)), y)

    return explicit_hessian(objective, theta), torch.autograd.functional.jacobian(objective, theta)


def _explicit_ggn(model, x, y, loss):
    """Jᵀ (∇²_f L) J with J the Jacobian of the outputs in the flat parameters."""
    params = dict(model.named_parameters())
    shapes = [p.shape for p in params.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def outputs(flat):
        values = dict(zip(params, torch.split(flat, [s.numel() for s in shapes])))
        return functional_call(model, {n: v.view(s) for (n, v), s in zip(values.items(), shapes)},
                               (x,))

    f = outputs(theta).detach()
    jac = torch.autograd.functional.jacobian(outputs, theta).reshape(f.numel(), -1)
    out_hessian = explicit_hessian(lambda o: loss(o.view(f.shape), y), f.reshape(-1))
    return jac.T @ out_hessian @ jac


def _chain(activation, *, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 6), activation, nn.Linear(6, 4),
                         activation, nn.Linear(4, 3)).double().eval()


ACTIVATIONS = [nn.ReLU(), nn.LeakyReLU(0.1), nn.Tanh(), nn.GELU(), nn.Softplus(), nn.SiLU(),
               nn.Sigmoid(), Erf(), nn.ReLU(inplace=True)]


def _check(model, x, y, loss, **kwargs):
    names = kwargs.pop("names", None)
    h, g = _explicit(model, x, y, cross_entropy if loss == "cross_entropy" else mse, names)
    op = curvature.hessian(model, (x, y), loss=loss, **kwargs)
    assert isinstance(op._cache()[1], FeedForwardCurvature)
    torch.testing.assert_close(op.dense(), h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.gradient(), g, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(op.matmat(v), h @ v, rtol=1e-10, atol=1e-12)
    return op


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda m: repr(m))
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_chain_products_match_the_explicit_hessian(activation, loss):
    x, y = _data()
    _check(_chain(activation), x, y, loss)


def test_ignored_targets_float_targets_flattened_inputs_and_nested_chains():
    x, y = _data(shape=(1, 5))  # (N, 1, 5): the leading Flatten makes it (N, 5)
    y[[2, 7]] = -100  # not counted in the mean cross-entropy
    torch.manual_seed(0)
    nested = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout()),
                           nn.Identity(), nn.Sequential(nn.Linear(6, 3, bias=False))).double()
    _check(nested.eval(), x, y, "cross_entropy")
    soft = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    _check(nested, x, soft, "mse")


def test_ntk_parameterisation_and_stacked_activations():
    x, y = _data()
    torch.manual_seed(0)
    ntk = mlp(5, [6, 4], 3, parameterization="ntk", activation="erf", weight_std=1.3,
              bias_std=0.4).double().eval()
    _check(ntk, x, y, "cross_entropy")
    torch.manual_seed(0)
    stacked = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.ReLU(), nn.Linear(6, 3),
                            nn.Softplus()).double()  # an activation after the last layer too
    _check(stacked, x, y, "cross_entropy")


@pytest.mark.parametrize("names", [["3.weight"], ["1.weight", "1.bias"], ["3.bias", "5.weight"]])
def test_parameter_subsets_are_the_explicit_hessian_block(names):
    x, y = _data()
    model = _chain(nn.Tanh())
    _check(model, x, y, "cross_entropy", names=names, param_filter=names)


def test_frozen_layers_are_held_fixed():
    x, y = _data()
    model = _chain(nn.GELU())
    model[3].requires_grad_(False)
    names = ["1.weight", "1.bias", "5.weight", "5.bias"]
    _check(model, x, y, "cross_entropy", names=names)


def test_top_eigenvalues_of_a_relu_mlp_match_the_explicit_spectrum():
    x, y = _data(n=40)
    torch.manual_seed(3)
    model = mlp(5, [8, 8], 3).double().eval()
    h, _ = _explicit(model, x, y, cross_entropy)
    spectrum = curvature.top_eigenvalues(model, (x, y), k=3, tol=1e-8)
    torch.testing.assert_close(spectrum.values, torch.linalg.eigvalsh(h).flip(0)[:3],
                               rtol=1e-8, atol=1e-10)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


def _fallbacks():
    torch.manual_seed(0)
    hooked = _chain(nn.Tanh())
    hooked[1].register_forward_hook(lambda module, inputs, output: output * 1.5)
    return {
        "batchnorm": nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                   nn.Linear(6, 3)).double().eval(),
        "subclass": nn.Sequential(_ScaledLinear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double(),
        "hook": hooked,
        "not a sequential": _Wrapped().double(),
    }


@pytest.mark.parametrize("case", ["batchnorm", "subclass", "hook", "not a sequential"])
def test_other_models_fall_back_to_autograd_with_the_same_products(case):
    x, y = _data()
    model = _fallbacks()[case]
    op = curvature.hessian(model, (x, y))
    assert isinstance(op._cache()[1], _RecordedGradient)
    h, _ = _explicit(model, x, y, cross_entropy)
    torch.testing.assert_close(op.dense(), h, rtol=1e-10, atol=1e-12)


def test_custom_losses_fall_back():
    x, y = _data()
    custom = curvature.hessian(_chain(nn.Tanh()), (x, y), loss=lambda f, t: cross_entropy(f, t))
    assert isinstance(custom._cache()[1], _RecordedGradient)
    h, _ = _explicit(_chain(nn.Tanh()), x, y, cross_entropy)
    torch.testing.assert_close(custom.dense(), h, rtol=1e-10, atol=1e-12)


def test_a_layer_applied_twice_falls_back_and_the_model_stays_intact():
    """The repeated layer's gradient sums both uses (the chain path refuses it), and the
    functional calls leave its parameters as they were (torch alone turns them into plain
    tensors that do not require grad, pytorch/pytorch#164759). Reference: the network
    written out by hand."""
    x, y = _data()
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), shared, nn.Tanh(), shared,
                          nn.Linear(6, 3)).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def by_hand(flat):
        w0, b0, w2, b2, w5, b5 = torch.split(flat, [s.numel() for s in shapes])
        lin = lambda h, w, b, s: h @ w.view(s).T + b  # noqa: E731
        h = torch.tanh(lin(x, w0, b0, shapes[0]))
        h = lin(torch.tanh(lin(h, w2, b2, shapes[2])), w2, b2, shapes[2])
        return cross_entropy(lin(h, w5, b5, shapes[4]), y)

    op = curvature.hessian(model, (x, y))
    assert isinstance(op._cache()[1], _RecordedGradient) and op.param_names == tuple(names)
    torch.testing.assert_close(op.dense(), explicit_hessian(by_hand, theta), rtol=1e-10,
                               atol=1e-12)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in shared.parameters())
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.Tanh(), nn.GELU()], ids=repr)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_chain_gauss_newton_products_match_the_explicit_ggn(activation, loss):
    x, y = _data()
    y[3] = -100 if loss == "cross_entropy" else y[3]
    model = _chain(activation)
    g = _explicit_ggn(model, x, y, cross_entropy if loss == "cross_entropy" else mse)
    op = curvature.ggn(model, (x, y), loss=loss)
    assert isinstance(op._cache()[1], FeedForwardCurvature)
    torch.testing.assert_close(op.dense(), g, rtol=1e-10, atol=1e-12)
    fresh = curvature.ggn(model, (x, y), loss=loss, cache=False)  # the autograd jvp/vjp path
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(fresh.matvec(v), g @ v, rtol=1e-10, atol=1e-12)
    subset = curvature.ggn(model, (x, y), loss=loss, param_filter="3")
    idx = torch.cat([torch.arange(s, s + n) for s, n in _offsets(model, ["3.weight", "3.bias"])])
    torch.testing.assert_close(subset.dense(), g[idx][:, idx], rtol=1e-10, atol=1e-12)


def _offsets(model, names):
    spans, offset = {}, 0
    for name, p in model.named_parameters():
        spans[name] = (offset, p.numel())
        offset += p.numel()
    return [spans[n] for n in names]


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_several_batches_keep_one_recording_each(kind, monkeypatch):
    """Tensor data in batches of 5 (23 = 4·5 + 3): every batch's recording is kept and the
    size-weighted mean of their products is the explicit matrix; under a small memory
    budget only the first batches are kept and the others are computed afresh."""
    from ridgeline.curvature import operators

    x, y = _data(n=23)
    model = _chain(nn.Tanh())
    h, g = _explicit(model, x, y, cross_entropy)
    expected = h if kind == "hessian" else _explicit_ggn(model, x, y, cross_entropy)
    op = getattr(curvature, kind)(model, (x, y), batch_size=5)
    assert sorted(op._recordings()) == [0, 1, 2, 3, 4]
    assert all(isinstance(r, FeedForwardCurvature) for r in op._recordings().values())
    torch.testing.assert_close(op.dense(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.gradient(), g, rtol=1e-10, atol=1e-12)
    one = next(iter(op._recordings().values())).nbytes
    monkeypatch.setattr(operators, "DEFAULT_MEMORY_BUDGET", 2 * one + 1)
    partial = getattr(curvature, kind)(model, (x, y), batch_size=5)
    assert sorted(partial._recordings()) == [0, 1]
    torch.testing.assert_close(partial.dense(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(partial.gradient(), g, rtol=1e-10, atol=1e-12)


def test_loaders_and_other_models_keep_no_per_batch_recordings():
    """A data loader may shuffle between passes, so its batches are computed afresh."""
    x, y = _data(n=23)
    model = _chain(nn.Tanh())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5,
                                         shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    op = curvature.hessian(model, loader)
    assert op._recordings() == {}
    h, _ = _explicit(model, x, y, cross_entropy)
    torch.testing.assert_close(op.dense(), h, rtol=1e-10, atol=1e-12)
    other = curvature.hessian(_Wrapped().double(), (x, y), batch_size=5)
    assert other._recordings() == {}
    assert curvature.hessian(model, (x, y), batch_size=5, cache=False)._recordings() == {}


@pytest.mark.parametrize("gauss_newton", [False, True])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_stacked_tangents_give_the_products_one_by_one(activation, gauss_newton):
    """The batched-GEMM sweep (used on accelerators) against single products, with a
    frozen first layer and NTK scales."""
    from ridgeline.curvature.feedforward import feedforward_curvature

    x, y = _data()
    torch.manual_seed(0)
    model = mlp(5, [6, 4], 3, activation=activation, parameterization="ntk",
                bias_std=0.3).double().eval()
    model[1].requires_grad_(False)
    op = (curvature.ggn if gauss_newton else curvature.hessian)(model, (x, y))
    chain = feedforward_curvature(op.objective, op._fixed, op._params, x, y,
                                  gauss_newton=gauss_newton)
    v = torch.randn(3, op.shape[0], generator=torch.Generator().manual_seed(5), dtype=F64)
    stacked = chain.stacked(op.unflatten(v))
    for i in range(3):
        single = chain(op.unflatten(v[i]))
        for name in chain.names:
            torch.testing.assert_close(stacked[name][i], single[name], rtol=1e-12, atol=1e-14)
