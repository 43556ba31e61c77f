"""Layers shared by the reference models."""

from __future__ import annotations

import math

import torch
from torch import nn

from ridgeline.errors import ConfigError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "erf": None,  # filled below
    "identity": nn.Identity,
    "softplus": nn.Softplus,
}


class Erf(nn.Module):
    """The error function as an activation (it has a closed-form infinite-width kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


ACTIVATIONS["erf"] = Erf


def activation_layer(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


class NTKLinear(nn.Module):
    """A linear layer in NTK parameterisation (Jacot et al. 2018).

    y = (σ_w / √fan_in) W x + σ_b b, with W and b initialised i.i.d. N(0, 1), so that the
    network has a well-defined infinite-width limit.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_std: float = 1.0, bias_std: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight) * (self.weight_std / math.sqrt(self.in_features))
        if self.bias is not None:
            out = out + self.bias_std * self.bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_std={self.weight_std}, bias_std={self.bias_std}")


class ChannelLayerNorm(nn.GroupNorm):
    """LayerNorm over (channels, positions) of a conv feature map with a per-channel affine
    (``GroupNorm`` with one group), as used in LayerNorm ResNets."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels)


def norm_layer(kind: str | None, features: int, *, conv_dims: int = 0) -> nn.Module:
    """BatchNorm or LayerNorm for dense (``conv_dims=0``) or 1-D/2-D conv features."""
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "batch":
        return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[conv_dims](features)
    if kind == "layer":
        return nn.LayerNorm(features) if conv_dims == 0 else ChannelLayerNorm(features)
    raise ConfigError(f"unknown norm {kind!r}; choose None, 'batch' or 'layer'.")
