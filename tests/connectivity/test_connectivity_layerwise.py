"""Layer-wise barriers against a hand computation on a 2-layer network."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from ridgeline.connectivity import layer_groups, layerwise_barriers
from ridgeline.errors import ConfigError
from ridgeline.models import mlp


def test_layerwise_barriers_on_a_two_layer_net_match_a_hand_computation():
    torch.manual_seed(0)
    a = mlp(4, [5], 3, activation="tanh").double()
    torch.manual_seed(1)
    b = mlp(4, [5], 3, activation="tanh").double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    result = layerwise_barriers(a, b, (x, y), points=11)
    assert result.layers == ("1", "3")
    assert result.parameters == (("1.weight", "1.bias"), ("3.weight", "3.bias"))

    wa1, ba1, wa2, ba2 = (t.detach() for t in (a[1].weight, a[1].bias, a[3].weight, a[3].bias))
    wb1, bb1, wb2, bb2 = (t.detach() for t in (b[1].weight, b[1].bias, b[3].weight, b[3].bias))

    def loss(w1, b1, w2, b2):
        return float(F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y))

    alphas = [i / 10 for i in range(11)]
    curves = {
        "1": [loss(wa1 + t * (wb1 - wa1), ba1 + t * (bb1 - ba1), wa2, ba2) for t in alphas],
        "3": [loss(wa1, ba1, wa2 + t * (wb2 - wa2), ba2 + t * (bb2 - ba2)) for t in alphas],
    }
    for layer, curve in curves.items():
        expected = max(v - ((1 - t) * curve[0] + t * curve[-1]) for t, v in zip(alphas, curve))
        path = result.paths[result.layers.index(layer)]
        assert path.losses == pytest.approx(curve, abs=1e-12)
        assert result.barriers[result.layers.index(layer)] == pytest.approx(expected, abs=1e-12)
    json.dumps(result.to_dict())
    assert result.plot() is not None


def test_layer_groupings():
    params = dict(mlp(4, [5], 3).named_parameters())
    assert layer_groups(params, "module") == {"1": ["1.weight", "1.bias"], "3": ["3.weight", "3.bias"]}
    assert list(layer_groups(params, "tensor")) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert layer_groups(params, ["3"]) == {"3": ["3.weight", "3.bias"]}
    assert layer_groups(params, {"w": ["1.weight", "3.weight"]}) == {"w": ["1.weight", "3.weight"]}
    with pytest.raises(ConfigError, match="matches no parameter"):
        layer_groups(params, ["7"])
    with pytest.raises(ConfigError, match="does not have"):
        layer_groups(params, {"w": ["9.weight"]})
