"""Checking and coercing the inputs of the transport instrument.

Point clouds are tensors ``(..., n, d)``: n points in R^d, with optional leading batch
dimensions (several pairs at once). A 1-D tensor ``(n,)`` is n points on the real line.
Every user mistake is caught here, before any expensive work, with a ridgeline error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ridgeline.errors import ConfigError, DataError, ShapeMismatchError

__all__ = ["PointClouds", "as_points", "check_p", "check_number", "check_control_variate", "prepare_pair",
           "compute_dtype"]

CONTROL_VARIATES = (None, "lower", "upper")


@dataclass(frozen=True)
class PointClouds:
    """A validated pair of point clouds, in the dtype the computation runs in.

    Attributes
    ----------
    x : Tensor (..., n, d)
    y : Tensor (..., m, d)
    weights_x : Tensor (..., n) or None
        Normalised to sum to 1; ``None`` means uniform weights 1/n.
    weights_y : Tensor (..., m) or None
    out_dtype : torch.dtype
        The dtype results are returned in (the inputs' promoted dtype).
    """

    x: torch.Tensor
    y: torch.Tensor
    weights_x: torch.Tensor | None
    weights_y: torch.Tensor | None
    out_dtype: torch.dtype

    @property
    def dim(self) -> int:
        return int(self.x.shape[-1])

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.x.shape[:-2], self.y.shape[:-2])

    @property
    def uniform(self) -> bool:
        return self.weights_x is None and self.weights_y is None

    def detach(self) -> PointClouds:
        """The same clouds cut from the autograd graph (for optimising directions)."""
        wx = None if self.weights_x is None else self.weights_x.detach()
        wy = None if self.weights_y is None else self.weights_y.detach()
        return PointClouds(self.x.detach(), self.y.detach(), wx, wy, self.out_dtype)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weighted) means m_x (..., d) and m_y (..., d)."""
        return tuple(  # type: ignore[return-value]
            points.mean(-2) if weights is None else (weights.unsqueeze(-1) * points).sum(-2)
            for points, weights in ((self.x, self.weights_x), (self.y, self.weights_y)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 (sorting and sums need the mantissa)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def as_points(value: Any, name: str) -> torch.Tensor:
    """A floating tensor ``(..., n, d)`` from a tensor or array; ``(n,)`` becomes ``(n, 1)``."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{name} must be a tensor or array of points of shape (n, d); got "
                            f"{type(value).__name__} ({exc}).") from exc
    if value.is_complex() or value.dtype == torch.bool:
        raise DataError(f"{name} must hold real numbers; got dtype {value.dtype}.")
    if not value.is_floating_point():
        value = value.to(torch.get_default_dtype())
    if value.dim() == 0:
        raise ShapeMismatchError(f"{name} is a scalar; pass points of shape (n, d) or (n,).")
    if value.dim() == 1:
        value = value.unsqueeze(-1)
    return value


def check_number(value: Any, name: str, *, minimum: float, why: str = "") -> float:
    """A finite real option ≥ ``minimum``, or a ConfigError saying so."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < minimum:
        raise ConfigError(f"{name} must be a finite number ≥ {minimum:g}{why}; got {value!r}.")
    return number


def check_p(p: float) -> float:
    """The order p of the Wasserstein distance: a finite number ≥ 1."""
    return check_number(p, "p", minimum=1, why=" (W_p is not a distance for p < 1)")


def check_control_variate(control_variate: str | None, p: float) -> str | None:
    if control_variate not in CONTROL_VARIATES:
        raise ConfigError(f"control_variate must be None, 'lower' or 'upper'; got "
                          f"{control_variate!r}.")
    if control_variate is not None and p != 2:
        raise ConfigError(f"control variates are defined for p=2 only (Gaussian approximations "
                          f"of W_2^2); got p={p}. Use control_variate=None for p≠2.")
    return control_variate


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise DataError(f"{name} contains {bad} NaN or infinite value(s); remove or replace "
                        "them before measuring a distance.")


def _check_weights(weights: Any, points: torch.Tensor, name: str, points_name: str,
                   dtype: torch.dtype) -> torch.Tensor | None:
    if weights is None:
        return None
    weights = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(np.asarray(weights))
    weights = weights.to(device=points.device, dtype=dtype)
    n = points.shape[-2]
    if weights.dim() == 0 or weights.shape[-1] != n:
        raise ShapeMismatchError(f"{name} has shape {tuple(weights.shape)} but {points_name} has "
                                 f"{n} points; pass one weight per point, shape ({n},) or "
                                 f"(..., {n}).")
    try:
        torch.broadcast_shapes(weights.shape[:-1], points.shape[:-2])
    except RuntimeError as exc:
        raise ShapeMismatchError(f"{name} has batch shape {tuple(weights.shape[:-1])}, which does "
                                 f"not broadcast with {points_name}'s batch shape "
                                 f"{tuple(points.shape[:-2])}.") from exc
    _check_finite(weights, name)
    if bool((weights < 0).any()):
        raise DataError(f"{name} has {int((weights < 0).sum())} negative weight(s) (minimum "
                        f"{float(weights.min()):.3g}); weights are probabilities, ≥ 0.")
    totals = weights.sum(-1)
    tol = math.sqrt(torch.finfo(dtype).eps)
    if bool(((totals - 1).abs() > tol).any()):
        worst = float(totals.flatten()[(totals - 1).abs().flatten().argmax()])
        raise DataError(f"{name} sums to {worst:.6g}, not 1 (tolerance {tol:.1e}); normalise "
                        f"the weights, e.g. w / w.sum(-1, keepdim=True).")
    return weights / totals.unsqueeze(-1)


def prepare_pair(x: Any, y: Any, weights_x: Any = None, weights_y: Any = None,
                 *, names: tuple[str, str] = ("x", "y")) -> PointClouds:
    """Validate two point clouds (and their weights) and bring them to one dtype."""
    x, y = as_points(x, names[0]), as_points(y, names[1])
    if x.shape[-1] != y.shape[-1]:
        raise ShapeMismatchError(f"{names[0]} has points in d={x.shape[-1]} dimensions but "
                                 f"{names[1]} in d={y.shape[-1]}; both clouds must live in the "
                                 "same space (shapes (n, d) and (m, d)).")
    for tensor, name in ((x, names[0]), (y, names[1])):
        if tensor.shape[-2] == 0 or tensor.shape[-1] == 0:
            raise DataError(f"{name} is empty (shape {tuple(tensor.shape)}); a point cloud needs "
                            "at least one point in at least one dimension.")
    try:
        torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except RuntimeError as exc:
        raise ShapeMismatchError(f"batch shapes {tuple(x.shape[:-2])} of {names[0]} and "
                                 f"{tuple(y.shape[:-2])} of {names[1]} do not broadcast.") from exc
    if x.device != y.device:
        raise DataError(f"{names[0]} is on {x.device} but {names[1]} is on {y.device}; move both "
                        "to one device.")
    out_dtype = torch.promote_types(x.dtype, y.dtype)
    dtype = compute_dtype(out_dtype)
    x, y = x.to(dtype), y.to(dtype)
    _check_finite(x.detach(), names[0])
    _check_finite(y.detach(), names[1])
    wx = _check_weights(weights_x, x, f"weights_{names[0]}", names[0], dtype)
    wy = _check_weights(weights_y, y, f"weights_{names[1]}", names[1], dtype)
    return PointClouds(x, y, wx, wy, out_dtype)
