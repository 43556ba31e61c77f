"""Loss functions by name. Every loss returns the mean over the examples of a batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from ridgeline.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy; targets are class indices."""
    return F.cross_entropy(outputs, targets)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over examples of ½‖f(x) − y‖² (summed over outputs).

    Integer class targets are one-hot encoded. This scaling makes gradient flow
    dθ/dt = −η∇L give the kernel dynamics f_t = Y + e^{−ηΘt/N}(f_0 − Y) of Jacot et al.
    """
    if not targets.is_floating_point():
        targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    targets = targets.reshape(outputs.shape)
    return 0.5 * (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(dim=1).mean()


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


def resolve_loss(loss: str | LossFn) -> tuple[str, LossFn]:
    """(name, function) for a loss name or a callable ``(outputs, targets) -> scalar``."""
    if callable(loss):
        return getattr(loss, "__name__", "custom"), loss
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or pass a "
                          "callable (outputs, targets) -> scalar mean over the batch.")
    return loss, LOSSES[loss]
