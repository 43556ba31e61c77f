"""Built-in datasets and reference models."""

from __future__ import annotations

import pytest
import torch

from ridgeline.data import digits, gaussian_mixture, load_dataset, mnist1d, teacher
from ridgeline.errors import ConfigError, DataError
from ridgeline.models import NTKLinear, build_model, cnn1d, mlp, resnet


def test_mnist1d_shapes_and_determinism():
    train, test = mnist1d("train"), mnist1d("test")
    assert train.inputs.shape == (4000, 40) and test.inputs.shape == (1000, 40)
    assert train.num_classes == 10 and set(train.targets.unique().tolist()) == set(range(10))
    assert abs(float(torch.cat([train.inputs, test.inputs]).std()) - 1.0) < 1e-3
    again = mnist1d("train")
    assert torch.equal(train.inputs, again.inputs) and torch.equal(train.targets, again.targets)
    other = mnist1d("train", seed=7, num_samples=500)
    assert other.inputs.shape == (400, 40)
    assert not torch.equal(other.inputs, train.inputs[:400])


def test_mnist1d_does_not_touch_numpy_global_state():
    import numpy as np

    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    mnist1d("train", seed=3, num_samples=100)
    assert np.random.rand() == expected


def test_digits_split_is_fixed_and_disjoint():
    train, test = digits("train"), digits("test")
    assert len(train) + len(test) == 1797 and train.inputs.shape[1] == 64
    assert float(train.inputs.max()) <= 1.0
    assert digits("train", flatten=False).inputs.shape[1:] == (1, 8, 8)


def test_synthetic_splits_share_the_task():
    a, b = gaussian_mixture(200, split="train"), gaussian_mixture(200, split="test")
    for c in range(4):  # same cluster means in both splits
        assert torch.allclose(a.class_subset(c).inputs.mean(0), b.class_subset(c).inputs.mean(0), atol=0.5)
    reg = teacher(50, dim=3, outputs=2)
    assert reg.targets.shape == (50, 2) and reg.num_classes is None
    assert teacher(50, outputs=3, classification=True).targets.dtype == torch.int64
    with pytest.raises(DataError):
        load_dataset("imagenet")


def test_ntk_parameterisation_scales_by_fan_in():
    torch.manual_seed(0)
    layer = NTKLinear(50, 3, weight_std=2.0, bias_std=0.5)
    x = torch.randn(4, 50)
    expected = 2.0 / 50**0.5 * x @ layer.weight.T + 0.5 * layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    net = mlp(50, [1000], 1, parameterization="ntk")
    assert abs(float(net[1].weight.detach().std()) - 1.0) < 0.02  # N(0, 1) weights


@pytest.mark.parametrize("model,shape", [
    (lambda: mlp(40, [16, 16], 10, norm="layer"), (5, 40)),
    (lambda: cnn1d(), (5, 40)),
    (lambda: cnn1d(norm="batch", dims=2, in_channels=1), (5, 1, 8, 8)),
    (lambda: resnet(norm="batch"), (5, 40)),
    (lambda: resnet(norm="layer", dims=2), (5, 1, 8, 8)),
])
def test_reference_models_run_and_remember_their_arguments(model, shape):
    net = model()
    assert net(torch.randn(*shape)).shape == (5, 10)
    arch = net.ridgeline_architecture
    rebuilt = build_model(arch["factory"], **arch["kwargs"])
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in net.parameters()]


def test_bad_model_arguments():
    with pytest.raises(ConfigError):
        mlp(4, [3], 2, activation="swishy")
    with pytest.raises(ConfigError):
        build_model("transformer")
    with pytest.raises(ConfigError):
        resnet(norm="group")
