"""Parameter vectors and random directions (filter normalisation, Li et al. 2018)."""

from __future__ import annotations

import pytest
import torch

from ridgeline.errors import ArchitectureMismatchError, ConfigError, ShapeMismatchError
from ridgeline.models import cnn1d, mlp
from ridgeline.params import (
    check_same_structure,
    flatten,
    lerp,
    named_parameters,
    random_direction,
    unflatten,
)


def test_flatten_unflatten_round_trip():
    params = named_parameters(mlp(4, [3], 2))
    vector = flatten(params)
    assert vector.numel() == 4 * 3 + 3 + 3 * 2 + 2
    back = unflatten(vector, params)
    for key in params:
        assert torch.equal(back[key], params[key])
    with pytest.raises(ShapeMismatchError):
        unflatten(vector[:-1], params)


@pytest.mark.parametrize("factory", [lambda: mlp(6, [8, 5], 3), lambda: cnn1d(1, (4, 6), 3)])
def test_filter_normalised_direction_has_the_norm_of_each_filter(factory):
    torch.manual_seed(0)
    params = named_parameters(factory())
    direction = random_direction(params, normalization="filter", seed=3)
    for name, theta in params.items():
        d = direction[name]
        if theta.dim() <= 1:
            assert torch.count_nonzero(d) == 0, f"{name}: biases are ignored by default"
            continue
        theta_rows = theta.reshape(theta.shape[0], -1).norm(dim=1)
        d_rows = d.reshape(d.shape[0], -1).norm(dim=1)
        assert torch.allclose(d_rows, theta_rows, rtol=1e-5), name


def test_layer_and_model_normalisation_and_seed():
    params = named_parameters(mlp(6, [8], 3))
    layer = random_direction(params, normalization="layer", ignore=None, seed=1)
    for name in params:
        assert torch.allclose(layer[name].norm(), params[name].norm(), rtol=1e-5)
    model = random_direction(params, normalization="model", ignore=None, seed=1)
    assert torch.allclose(flatten(model).norm(), flatten(params).norm(), rtol=1e-5)
    again = random_direction(params, normalization="model", ignore=None, seed=1)
    assert torch.equal(flatten(model), flatten(again))
    rademacher = random_direction(params, kind="rademacher", normalization=None, ignore=None)
    assert set(flatten(rademacher).unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ConfigError):
        random_direction(params, kind="uniform")


def test_lerp_and_structure_check():
    a, b = named_parameters(mlp(3, [2], 2)), named_parameters(mlp(3, [2], 2))
    mid = lerp(a, b, 0.25)
    for key in a:
        assert torch.allclose(mid[key], 0.75 * a[key] + 0.25 * b[key])
    with pytest.raises(ArchitectureMismatchError, match=r"'1.weight' has shape \(4, 3\)"):
        check_same_structure(a, named_parameters(mlp(3, [4], 2)))


def test_functional_call_keeps_repeated_modules_and_ties_intact():
    """A layer applied twice and a weight tied across two layers both take the values
    given, and the model keeps its parameters afterwards (pytorch/pytorch#164759)."""
    from torch import nn

    from ridgeline.params import functional_call

    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 4))
    model[3].weight = shared.weight  # tied across modules as well
    before = {n: p for n, p in model.named_parameters()}
    values = {n: torch.randn_like(p) for n, p in before.items()}
    x = torch.randn(3, 4)
    w, b, b3 = values["0.weight"], values["0.bias"], values["3.bias"]
    expected = torch.tanh(x @ w.T + b) @ w.T + b
    expected = expected @ w.T + b3
    torch.testing.assert_close(functional_call(model, values, (x,)), expected)
    assert {n: p for n, p in model.named_parameters()} == before
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in model.parameters())
