"""A small residual network with BatchNorm or LayerNorm, for 1-D signals or 2-D images."""

from __future__ import annotations

from torch import nn

from ridgeline.errors import ConfigError
from ridgeline.models.cnn import AddChannel
from ridgeline.models.layers import norm_layer
from ridgeline.models.registry import model_factory


class BasicBlock(nn.Module):
    """x + conv-norm-relu-conv-norm(x), then ReLU (He et al. 2016), width-preserving."""

    def __init__(self, channels: int, norm: str, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv1 = conv(channels, channels, 3, padding=1, bias=False)
        self.norm1 = norm_layer(norm, channels, conv_dims=dims)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, channels, conv_dims=dims)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(x + out)


class ResNet(nn.Module):
    """Stem conv → stages of BasicBlocks (down-sampling by stride-2 conv between stages)
    → global average pool → linear head."""

    def __init__(self, in_channels: int, widths: list[int], blocks_per_stage: int,
                 out_features: int, norm: str, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.add_channel = AddChannel(dims)
        self.stem = nn.Sequential(conv(in_channels, widths[0], 3, padding=1, bias=False),
                                  norm_layer(norm, widths[0], conv_dims=dims), nn.ReLU())
        stages: list[nn.Module] = []
        for index, width in enumerate(widths):
            layers: list[nn.Module] = []
            if index > 0:
                layers += [conv(widths[index - 1], width, 3, stride=2, padding=1, bias=False),
                           norm_layer(norm, width, conv_dims=dims), nn.ReLU()]
            layers += [BasicBlock(width, norm, dims) for _ in range(blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(widths[-1], out_features)

    def forward(self, x):
        x = self.stem(self.add_channel(x))
        x = self.stages(x)
        return self.head(self.flatten(self.pool(x)))


@model_factory("resnet")
def resnet(in_channels: int = 1, widths: tuple[int, ...] = (16, 32), out_features: int = 10, *,
           blocks_per_stage: int = 1, norm: str = "batch", dims: int = 1) -> ResNet:
    """A small ResNet: ``len(widths)`` stages of ``blocks_per_stage`` basic blocks.

    Parameters
    ----------
    norm : {"batch", "layer"}
        BatchNorm, or LayerNorm over (channels, positions) with per-channel affine.
    dims : {1, 2}
        1-D signals (N, L) or (N, C, L), or 2-D images (N, C, H, W).
    """
    if norm not in ("batch", "layer"):
        raise ConfigError(f"resnet norm must be 'batch' or 'layer', got {norm!r}.")
    if dims not in (1, 2) or not widths:
        raise ConfigError(f"resnet needs dims in (1, 2) and at least one width; got dims={dims}, "
                          f"widths={list(widths)}.")
    return ResNet(in_channels, [int(w) for w in widths], blocks_per_stage, out_features, norm, dims)
