"""Science checks on MNIST-1D (slow): the Git Re-Basin effect and barrier prediction."""

from __future__ import annotations

import pytest
import torch

import ridgeline
from ridgeline import Objective
from ridgeline.connectivity import align, interpolate, predict_barrier
from ridgeline.data import mnist1d
from ridgeline.models import mlp


def _trained(init_seed: int, order_seed: int, data) -> torch.nn.Module:
    torch.manual_seed(init_seed)
    model = mlp(40, [512, 512], 10)
    ridgeline.train(model, data, lr=0.05, momentum=0.9, epochs=20, batch_size=128,
                    seed=order_seed, progress=False)
    return model.eval()


@pytest.mark.slow
def test_weight_matching_removes_most_of_the_barrier_between_wide_mnist1d_mlps():
    train = mnist1d("train")
    model_a, model_b = _trained(1, 1, train), _trained(2, 2, train)
    naive = interpolate(model_a, model_b, train)
    aligned = align(model_a, model_b)
    matched = interpolate(model_a, aligned.model, train)
    assert naive.barrier > 0.5  # a clear barrier between different seeds
    assert matched.barrier <= 0.3 * naive.barrier  # ≥ 70 % lower (Ainsworth et al. 2023)
    with torch.no_grad():
        drift = (aligned.model(train.inputs) - model_b(train.inputs)).abs().max()
    assert float(drift) <= 1e-4
    # the second-order prediction of the aligned path's barrier (max at α = ½)
    prediction = predict_barrier(model_a, aligned.model, train, points=11)
    assert prediction.predicted == pytest.approx(matched.barrier, rel=0.3)
    assert Objective(model_a, train).loss_and_accuracy()[1] > 0.6
