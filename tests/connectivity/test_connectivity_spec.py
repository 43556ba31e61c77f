"""Permutation specs traced with torch.fx: permuting by the spec never changes the function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ridgeline.connectivity import align, coerce_spec, permutation_spec, permute_model
from ridgeline.errors import ConfigError, UnsupportedOperationError
from ridgeline.models import cnn1d, mlp, resnet

FACTORIES = {
    "mlp": lambda: mlp(12, [9, 7], 4),
    "mlp-batchnorm": lambda: mlp(12, [9, 7], 4, norm="batch"),
    "mlp-layernorm": lambda: mlp(12, [9, 7], 4, norm="layer"),
    "mlp-ntk": lambda: mlp(12, [9, 7], 4, parameterization="ntk", bias_std=0.5),
    "cnn": lambda: cnn1d(channels=(6, 5), out_features=4),
    "resnet-batchnorm": lambda: resnet(widths=(4, 6), out_features=4, blocks_per_stage=2),
    "resnet-layernorm": lambda: resnet(widths=(4, 6), out_features=4, norm="layer"),
}


def _pair(name: str, dtype=torch.float64):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = FACTORIES[name]().to(dtype).eval()
        with torch.no_grad():  # non-trivial normalisation parameters and running statistics
            for key, tensor in list(model.named_parameters()) + list(model.named_buffers()):
                if tensor.is_floating_point() and tensor.dim() == 1:
                    tensor.copy_(torch.rand_like(tensor) + 0.5 if "var" in key or key.endswith(
                        "weight") else torch.randn_like(tensor))
        models.append(model)
    return models


def _inputs(dtype=torch.float64):
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(5), dtype=dtype)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_weight_aligned_model_outputs_equal_b_within_1e5(name):
    model_a, model_b = _pair(name, torch.float32)
    x = _inputs(torch.float32)
    result = align(model_a, model_b)
    assert result.spec.perms, "the traced spec must find permutable units"
    assert result.changed_units > 0
    with torch.no_grad():
        assert float((result.model(x) - model_b(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["mlp-batchnorm", "cnn", "resnet-layernorm"])
def test_activation_aligned_model_computes_exactly_b(name):
    model_a, model_b = _pair(name)
    x = _inputs()
    result = align(model_a, model_b, method="activations", data=(x, torch.zeros(16).long()))
    assert result.changed_units > 0
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model_b(x), atol=1e-10, rtol=0)


def test_residual_stream_shares_one_permutation_and_norms_follow_channels():
    spec = permutation_spec(resnet(widths=(4, 6), blocks_per_stage=2))
    stream = spec.axes["stem.0.weight"][0]
    assert stream is not None
    for name in ("stem.1.weight", "stem.1.running_mean", "stages.0.0.conv2.weight",
                 "stages.0.0.norm2.running_var", "stages.0.1.conv2.weight"):
        assert spec.axes[name][0] == stream, name
    assert spec.axes["stages.0.1.conv1.weight"][1] == stream  # block input is the stream
    inner = spec.axes["stages.0.0.conv1.weight"][0]
    assert inner not in (None, stream)
    assert spec.axes["stages.0.0.norm1.running_mean"] == (inner,)
    second = spec.axes["head.weight"][1]
    assert second not in (None, stream) and spec.axes["stages.1.0.weight"] == (second, stream, None)
    assert spec.axes["head.weight"][0] is None and spec.axes["head.bias"] == (None,)
    assert spec.axes["stem.0.weight"][1:] == (None, None)


def test_mlp_spec_matches_hand_written_git_rebasin_spec():
    spec = permutation_spec(mlp(5, [4, 3], 2))
    p1, p2 = spec.axes["1.weight"][0], spec.axes["3.weight"][0]
    expected = {"1.weight": (p1, None), "1.bias": (p1,), "3.weight": (p2, p1), "3.bias": (p2,),
                "5.weight": (None, p2), "5.bias": (None,)}
    assert spec.axes == expected and spec.perms == {p1: 4, p2: 3}


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.integers(2, 9))
def test_any_permutation_by_the_spec_preserves_the_function(seed, width):
    torch.manual_seed(seed)
    model = mlp(6, [width, width + 1], 3, norm="batch").double().eval()
    with torch.no_grad():
        for _, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 2.0)
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(seed)
    perms = {p: torch.randperm(n, generator=gen) for p, n in spec.perms.items()}
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(permute_model(model, spec, perms)(x), model(x), atol=1e-12, rtol=0)


class Flattening(nn.Module):
    """A user CNN that flattens channels × positions into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(5, 4, 3, padding=1), nn.GELU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.Tanh(),
                                        nn.Dropout(0.1), nn.Linear(6, 3))

    def forward(self, x):
        return self.classifier(self.features(x)).log_softmax(dim=-1)


def test_user_cnn_with_flatten_keeps_merged_channels_fixed_and_function_exact():
    torch.manual_seed(0)
    model_a, model_b = Flattening().double().eval(), Flattening().double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    spec = permutation_spec(model_a, example_input=x)
    assert spec.axes["features.4.weight"][0] is None  # flattened with positions: unpermuted
    assert spec.axes["features.0.weight"][0] is not None
    assert spec.axes["classifier.1.weight"][0] is not None
    result = align(model_a, model_b, spec=spec)
    torch.testing.assert_close(result.model(x), model_b(x), atol=1e-10, rtol=0)


class Sorting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumsum(self.fc(x), dim=-1)


def test_unanalysable_model_raises_and_explains_how_to_pass_spec():
    with pytest.raises(UnsupportedOperationError, match="spec="):
        permutation_spec(Sorting(), example_input=torch.randn(2, 4))


def test_manual_spec_works_and_is_checked():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), \
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    spec = {"0.weight": ("h", None), "0.bias": ("h",), "2.weight": (None, "h"), "2.bias": (None,)}
    result = align(a, b, spec=spec)
    x = torch.randn(5, 4)
    torch.testing.assert_close(result.model(x), b(x), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="does not cover.*2.bias"):
        coerce_spec({k: v for k, v in spec.items() if k != "2.bias"}, a)
    with pytest.raises(ConfigError, match="axes"):
        coerce_spec({**spec, "0.bias": ("h", None)}, a)
    with pytest.raises(ConfigError, match="different sizes"):
        coerce_spec({**spec, "2.weight": ("h", "h")}, a)
    with pytest.raises(ConfigError, match="does not have"):
        coerce_spec({**spec, "9.weight": (None,)}, a)


def test_spec_to_dict_is_plain():
    import json

    spec = permutation_spec(mlp(5, [4], 2))
    json.dumps(spec.to_dict())
