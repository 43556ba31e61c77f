"""Science checks of merging on MNIST-1D (slow: trains small networks)."""

from __future__ import annotations

import pytest
import torch

import ridgeline
from ridgeline.data import mnist1d
from ridgeline.merge import merge, predict_merge
from ridgeline.models import mlp

pytestmark = pytest.mark.slow


def _trained(seed, data, width=256, epochs=10):
    torch.manual_seed(seed)
    model = mlp(40, [width, width], 10)
    ridgeline.train(model, data, optimizer="sgd", lr=0.05, momentum=0.9, epochs=epochs,
                    batch_size=128, seed=seed, progress=False)
    return model.eval()


def test_aligned_average_of_two_seeds_keeps_the_endpoints_accuracy_naive_does_not():
    train, test = mnist1d("train"), mnist1d("test")
    a, b = _trained(1, train), _trained(2, train)

    def acc(model):
        return ridgeline.Objective(model, test).loss_and_accuracy()[1]

    mean = 0.5 * (acc(a) + acc(b))
    naive = acc(merge([a, b]).model)
    aligned = acc(merge([a, b], align="weights").model)
    assert naive < 0.75 * mean          # Git Re-Basin: the naive average collapses
    assert aligned >= 0.9 * mean        # and the aligned one does not
    plan = predict_merge([a, b], train.subset(500), methods=["average"],
                         align=[None, "weights", "activations"])
    assert plan.best_predicted != "average"      # the planner prefers an aligned merge
    assert plan.candidates[-1].label == "average"
