"""Landscape slices: points evaluated directly as θ + x d1 + y d2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from ridgeline.connectivity import interpolate
from ridgeline.connectivity import slice as landscape_slice
from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.models import mlp
from ridgeline.params import random_direction


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = mlp(4, [6], 3, activation="tanh").double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(21, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (21,), generator=gen)
    return model, (x, y)


def _loss_at(model, shift, data):
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(shift[name])
        return float(F.cross_entropy(moved(data[0]), data[1]))


def test_two_dimensional_slice_points_are_theta_plus_x_d1_plus_y_d2(setup):
    model, data = setup
    d1 = random_direction(model, seed=3)
    d2 = random_direction(model, seed=4)
    result = landscape_slice(model, data, directions=(d1, d2), dims=2, span=0.5, points=3)
    assert result.x == result.y == (-0.5, 0.0, 0.5)
    for j, y in enumerate(result.y):
        for i, x in enumerate(result.x):
            shift = {k: x * d1[k] + y * d2[k] for k in d1}
            assert result.losses[j][i] == pytest.approx(_loss_at(model, shift, data), abs=1e-12)
    assert result.losses[1][1] == pytest.approx(result.center_loss, abs=1e-12)
    json.dumps(result.to_dict())
    assert result.plot() is not None


def test_slice_toward_another_model_is_the_linear_path(setup):
    model, data = setup
    torch.manual_seed(9)
    other = mlp(4, [6], 3, activation="tanh").double().eval()
    result = landscape_slice(model, data, directions=(other,), dims=1, span=(0.0, 1.0), points=5)
    path = interpolate(model, other, data, points=5)
    assert result.losses == pytest.approx(path.losses, abs=1e-12)
    assert result.plot() is not None


def test_filter_directions_are_seeded_and_zero_on_biases(setup):
    model, data = setup
    first = landscape_slice(model, data, dims=1, points=3, seed=5)
    again = landscape_slice(model, data, dims=1, points=3, seed=5)
    assert first.losses == again.losses
    d = random_direction(model, seed=torch.Generator().manual_seed(5))
    assert first.losses[0] == pytest.approx(_loss_at(model, {k: -1.0 * v for k, v in d.items()}, data),
                                            abs=1e-12)
    assert all(float(v.abs().sum()) == 0 for k, v in d.items() if k.endswith("bias"))


def test_pca_directions_span_the_trajectory(setup):
    model, data = setup
    theta = {k: v.detach() for k, v in model.named_parameters()}
    direction = random_direction(model, seed=2)
    other = random_direction(model, seed=3)
    trajectory = [{k: v + t * direction[k] + 0.01 * t * t * other[k] for k, v in theta.items()}
                  for t in (-2.0, -1.0, 0.5, 1.0)]
    result = landscape_slice(model, data, directions="pca", trajectory=trajectory, points=3)
    assert result.explained_variance[0] > 0.99
    assert max(abs(c) for p in result.trajectory for c in p) == pytest.approx(1.0)


def test_hessian_directions_when_curvature_is_available(setup):
    curvature = pytest.importorskip("ridgeline.curvature")
    if not hasattr(curvature, "top_eigenvalues"):
        pytest.skip("ridgeline.curvature.top_eigenvalues is not there yet")
    model, data = setup
    result = landscape_slice(model, data, directions="hessian", dims=2, points=3)
    assert result.direction_norms == pytest.approx((1.0, 1.0), abs=1e-6)
    assert result.eigenvalues[0] >= result.eigenvalues[1]


def test_hessian_directions_with_a_frozen_layer_match_the_explicit_hessian():
    """A frozen first layer: the eigenvectors are over the trainable parameters only, are
    zero on the frozen ones, and match eigh of the Hessian computed explicitly with
    torch.autograd.functional.hessian over the trainable parameters."""
    pytest.importorskip("ridgeline.curvature")
    from ridgeline.params import flatten, unflatten

    torch.manual_seed(3)
    model = mlp(3, [4], 2, activation="tanh").double()
    model[1].requires_grad_(False)
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    result = landscape_slice(model, (x, y), directions="hessian", dims=1, points=5, span=0.5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    like = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_of(flat):
        params = dict(model.named_parameters())
        params.update(unflatten(flat, like))
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    hess = torch.autograd.functional.hessian(loss_of, flatten(like))
    values, vectors = torch.linalg.eigh(hess)
    top = int(values.abs().argmax())
    assert result.eigenvalues[0] == pytest.approx(float(values[top]), rel=1e-3)
    assert result.direction_norms == pytest.approx((1.0,), abs=1e-6)
    # the slice's losses are those of θ + x·v with v the explicit top eigenvector (either sign)
    flat0 = flatten(like)
    for sign in (1.0, -1.0):
        explicit = [float(loss_of(flat0 + c * sign * vectors[:, top])) for c in result.x]
        if explicit[0] == pytest.approx(result.losses[0], rel=1e-6):
            break
    assert list(result.losses) == pytest.approx(explicit, rel=1e-5)
    assert names == ["3.weight", "3.bias"]


def test_bad_slice_requests(setup):
    model, data = setup
    with pytest.raises(ConfigError):
        landscape_slice(model, data, dims=3)
    with pytest.raises(ConfigError, match="trajectory"):
        landscape_slice(model, data, directions="pca")
    with pytest.raises(ShapeMismatchError):
        landscape_slice(model, data, directions=(torch.zeros(5),), dims=1)
