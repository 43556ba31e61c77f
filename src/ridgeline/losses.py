"""Loss functions by name. Every loss returns the mean over the terms of a batch.

A term is an example, or a token for sequence targets: ``cross_entropy`` takes (N, C)
logits with (N,) class targets and (N, T, V) token logits with (N, T) token targets, and
averages over the targets that count (those not equal to :data:`IGNORE_INDEX`, as
PyTorch's ``F.cross_entropy`` and Hugging Face do). :func:`loss_weight` says how many
terms a batch mean averages, so that dataset means weight each batch by it and stay exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from ridgeline.errors import ConfigError, ShapeMismatchError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: targets equal to this are ignored by ``cross_entropy`` and accuracy (PyTorch's default)
IGNORE_INDEX = -100


def target_shape_error(logits_shape: tuple[int, ...], targets_shape: tuple[int, ...]
                       ) -> ShapeMismatchError | None:
    """The error for class or token targets whose shape does not fit the logits, or None.

    Logits (N, C) need targets (N,); logits (N, T, V) need (N, T) — one class index per
    position, the logits' shape without its last axis.
    """
    logits_shape, targets_shape = tuple(logits_shape), tuple(targets_shape)
    if len(logits_shape) >= 2 and targets_shape == logits_shape[:-1]:
        return None
    kind = "token" if len(logits_shape) >= 3 else "class"
    return ShapeMismatchError(
        f"cross_entropy got logits of shape {logits_shape} and {kind} targets of shape "
        f"{targets_shape}; the targets must have the logits' shape without the last (class) "
        f"axis, {logits_shape[:-1]}: (N,) class indices for (N, C) logits, (N, T) token "
        "indices for (N, T, V) logits (use -100 for positions to ignore). For next-token "
        "prediction pass (tokens[:, :-1], tokens[:, 1:]).")


def check_class_targets(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise :func:`target_shape_error` when the targets do not fit the logits."""
    error = target_shape_error(tuple(outputs.shape), tuple(targets.shape))
    if error is not None:
        raise error


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy −log softmax(f)_y over the targets that count.

    (N, C) logits with (N,) class indices, or (N, T, V) logits with (N, T) token indices
    (mean over every token whose target is not −100). A batch where every target is −100
    has no term (its mean is NaN, and its weight :func:`loss_weight` is zero). Float
    targets of the logits' shape are class probabilities, as in ``F.cross_entropy``.
    """
    if targets.is_floating_point() and targets.shape == outputs.shape:  # class probabilities
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]),
                               targets.reshape(-1, outputs.shape[-1]))
    check_class_targets(outputs, targets)
    if outputs.dim() > 2:
        outputs, targets = outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)


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


def counts_terms(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` averages over the targets that count (class/token targets)
    rather than over examples."""
    return loss_fn is cross_entropy


def loss_weight(loss_fn: LossFn, targets: torch.Tensor) -> int:
    """The number of terms the batch mean ``loss_fn(outputs, targets)`` averages.

    For ``cross_entropy`` on integer targets: the targets not equal to −100 (every token
    of every sequence that counts); otherwise the number of examples N. Dataset means
    Σ_b w_b L_b / Σ_b w_b with these weights equal the mean over all terms of the data.
    """
    if counts_terms(loss_fn) and not targets.is_floating_point():
        return int((targets != IGNORE_INDEX).sum())
    return int(targets.shape[0])


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of the targets that count (not −100) whose logit is the largest: per
    example for (N, C) logits, per token for (N, T, V); NaN when none counts."""
    keep = targets != IGNORE_INDEX
    hits = (outputs.argmax(dim=-1) == targets) & keep
    return hits.sum().to(outputs.dtype) / keep.sum().to(outputs.dtype)
