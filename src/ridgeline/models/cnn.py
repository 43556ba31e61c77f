"""A small 1-D/2-D convolutional network (the MNIST-1D reference CNN)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ridgeline.errors import ConfigError
from ridgeline.models.layers import activation_layer, norm_layer
from ridgeline.models.registry import model_factory


class AddChannel(nn.Module):
    """(N, L) → (N, 1, L) for 1-D signals given without a channel axis; no-op otherwise."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.unsqueeze(1) if x.dim() == self.dims + 1 else x


@model_factory("cnn1d")
def cnn1d(in_channels: int = 1, channels: Sequence[int] = (32, 32, 32), out_features: int = 10,
          *, kernel_size: int = 3, stride: int = 2, activation: str = "relu",
          norm: str | None = None, dims: int = 1) -> nn.Sequential:
    """Conv → [Norm] → activation blocks (stride 2), global average pool, linear head.

    With the defaults this is the MNIST-1D CNN of Greydanus (2020): three conv layers of 32
    channels on 40-sample signals. Inputs (N, L) are given a channel axis automatically.
    ``dims=2`` makes the same network for images (N, C, H, W).
    """
    if dims not in (1, 2):
        raise ConfigError(f"dims must be 1 or 2, got {dims}.")
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    layers: list[nn.Module] = [AddChannel(dims)]
    fan_in = in_channels
    for width in channels:
        layers += [conv(fan_in, int(width), kernel_size, stride=stride, padding=kernel_size // 2),
                   norm_layer(norm, int(width), conv_dims=dims), activation_layer(activation)]
        fan_in = int(width)
    layers += [pool, nn.Flatten(), nn.Linear(fan_in, out_features)]
    return nn.Sequential(*layers)
