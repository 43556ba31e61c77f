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
