"""Fully-connected networks of any width and depth."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ridgeline.errors import ConfigError
from ridgeline.models.layers import NTKLinear, activation_layer, norm_layer
from ridgeline.models.registry import model_factory


@model_factory("mlp")
def mlp(in_features: int, widths: Sequence[int], out_features: int, *,
        activation: str = "relu", parameterization: str = "standard",
        norm: str | None = None, bias: bool = True, weight_std: float = 1.0,
        bias_std: float = 0.0) -> nn.Sequential:
    """A multilayer perceptron ``in → widths[0] → … → widths[-1] → out``.

    Inputs of any shape (N, ...) are flattened. Each hidden layer is
    Linear → [Norm] → activation.

    Parameters
    ----------
    in_features, out_features : int
    widths : sequence of int
        Hidden widths (empty for a linear model).
    activation : {"relu", "tanh", "gelu", "erf", "softplus", "identity"}
    parameterization : {"standard", "ntk"}
        ``"ntk"`` uses :class:`NTKLinear`: weights N(0, 1) scaled by σ_w/√fan_in at run
        time and biases scaled by σ_b (``weight_std``, ``bias_std``), so that the
        infinite-width limit exists (Jacot et al. 2018). ``"standard"`` is PyTorch's default
        initialisation.
    norm : {None, "batch", "layer"}
    bias : bool
    """
    if parameterization not in ("standard", "ntk"):
        raise ConfigError(f"parameterization must be 'standard' or 'ntk', got {parameterization!r}.")
    if any(int(w) < 1 for w in widths) or in_features < 1 or out_features < 1:
        raise ConfigError(f"mlp widths must be positive, got in={in_features}, "
                          f"widths={list(widths)}, out={out_features}.")

    def linear(fan_in: int, fan_out: int) -> nn.Module:
        if parameterization == "ntk":
            return NTKLinear(fan_in, fan_out, bias=bias, weight_std=weight_std, bias_std=bias_std)
        return nn.Linear(fan_in, fan_out, bias=bias)

    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for width in widths:
        layers.append(linear(fan_in, int(width)))
        if norm is not None:
            layers.append(norm_layer(norm, int(width)))
        layers.append(activation_layer(activation))
        fan_in = int(width)
    layers.append(linear(fan_in, out_features))
    return nn.Sequential(*layers)
