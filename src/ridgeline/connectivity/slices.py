"""1-D and 2-D slices of the loss landscape around a network (Li et al. 2018).

Points are evaluated directly as θ + x·d1 (+ y·d2), never by accumulating steps, along
filter-normalised Gaussian directions, the direction to other networks, the top Hessian
eigenvectors, or the principal directions of a training trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError, ShapeMismatchError, UnsupportedOperationError
from ridgeline.losses import LossFn
from ridgeline.objective import Objective, as_objective
from ridgeline.params import (
    check_same_structure,
    flatten,
    make_generator,
    named_buffers,
    random_direction,
    sub,
    unflatten,
)
from ridgeline.progress import progress_bar

from .paths import PathEngine, all_parameters

__all__ = ["slice", "landscape_slice", "SliceResult", "slice_directions"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SliceResult:
    """Loss (and accuracy) on a line or a plane through θ.

    Attributes
    ----------
    dims : int
    x, y : tuple[float, ...]
        Coordinates along d1 (and d2); ``y`` is None for 1-D slices.
    losses : tuple
        1-D: one loss per x. 2-D: rows, ``losses[j][i]`` at (x[i], y[j]).
    accuracies : same layout, or None
    directions : str
        How the directions were chosen.
    direction_norms : tuple[float, ...]
        ‖d1‖ (and ‖d2‖).
    center_loss : float
        L(θ).
    trajectory : tuple[tuple[float, ...], ...] or None
        For ``directions="pca"``: the trajectory's coordinates in the plane.
    explained_variance : tuple[float, ...] or None
        For ``"pca"``: the fraction of the trajectory's variance along each direction.
    nonfinite : int
        How many points have a non-finite loss (kept as they are).
    eigenvalues : tuple[float, ...] or None
        For ``"hessian"``: the eigenvalues of the directions.
    """

    dims: int
    x: tuple[float, ...]
    y: tuple[float, ...] | None
    losses: tuple
    accuracies: tuple | None
    directions: str
    direction_norms: tuple[float, ...]
    center_loss: float
    trajectory: tuple[tuple[float, ...], ...] | None = None
    explained_variance: tuple[float, ...] | None = None
    nonfinite: int = 0
    eigenvalues: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        return to_jsonable({
            "dims": self.dims, "x": list(self.x), "y": None if self.y is None else list(self.y),
            "losses": self.losses, "accuracies": self.accuracies, "directions": self.directions,
            "direction_norms": list(self.direction_norms), "center_loss": self.center_loss,
            "trajectory": self.trajectory, "explained_variance": self.explained_variance,
            "nonfinite": self.nonfinite, "eigenvalues": self.eigenvalues})

    def plot(self, ax=None, *, metric: str = "loss", levels: int = 20, log: bool = True):
        """A line (1-D) or filled contour (2-D, log-spaced levels of the loss by default)."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(*((5, 4) if self.dims == 2 else (5, 3.2)))
        values = self.losses if metric == "loss" else self.accuracies
        if values is None:
            raise ConfigError(f"metric {metric!r} was not recorded; use 'loss'.")
        if self.dims == 1:
            ax.plot(self.x, values, marker="o", ms=3)
            ax.set_xlabel("x (along d1)")
            ax.set_ylabel(metric)
            return ax
        import numpy as np

        grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
        finite = grid[np.isfinite(grid)]
        if log and metric == "loss" and finite.size and finite.min() > 0:
            bounds = np.geomspace(finite.min(), finite.max(), levels) if finite.max() > finite.min() else levels
        else:
            bounds = levels
        filled = ax.contourf(self.x, self.y, grid, levels=bounds, cmap="viridis",
                             locator=None)
        ax.contour(self.x, self.y, grid, levels=bounds, colors="k", linewidths=0.3)
        ax.figure.colorbar(filled, ax=ax, label=metric)
        ax.scatter([0], [0], marker="*", color="white", edgecolor="k", s=80, zorder=3)
        if self.trajectory:
            ax.plot([p[0] for p in self.trajectory], [p[1] for p in self.trajectory], color="red",
                    marker=".", lw=1)
        ax.set_xlabel("x (along d1)")
        ax.set_ylabel("y (along d2)")
        ax.set_title(f"loss landscape ({self.directions} directions)")
        return ax


def _as_params(item: Any, like: Params, what: str) -> Params:
    if isinstance(item, nn.Module):
        other = all_parameters(item)
        check_same_structure(like, other, ("model", what))
        return other
    if isinstance(item, Mapping):
        check_same_structure(like, item, ("model", what))
        return {k: item[k].to(like[k].dtype) for k in like}
    if isinstance(item, torch.Tensor):
        total = sum(v.numel() for v in like.values())
        if item.dim() != 1 or item.numel() != total:
            raise ShapeMismatchError(f"{what} is a tensor of shape {tuple(item.shape)}; a flat "
                                     f"direction needs {total} entries (the parameter count).")
        return unflatten(item.to(next(iter(like.values())).dtype), like)
    raise ConfigError(f"{what} must be a model, a parameter dict or a flat tensor; got "
                      f"{type(item).__name__}.")


def slice_directions(objective: Objective, directions: Any, dims: int, *, seed: Any = 0,
                     trajectory: Sequence[Any] | None = None
                     ) -> tuple[list[Params], str, dict[str, Any]]:
    """The ``dims`` directions of a slice and a description of how they were made."""
    theta = all_parameters(objective.model)
    gen = make_generator(seed)
    extra: dict[str, Any] = {}
    if isinstance(directions, str):
        if directions == "filter":
            return [random_direction(theta, normalization="filter", ignore="biasbn", seed=gen)
                    for _ in range(dims)], "filter-normalised Gaussian", extra
        if directions == "hessian":
            try:
                from ridgeline.curvature import top_eigenvalues
            except ImportError as exc:
                raise UnsupportedOperationError(
                    "directions='hessian' needs ridgeline.curvature.top_eigenvalues, which is "
                    f"not available here ({exc}).") from exc
            spectrum = top_eigenvalues(objective, k=dims, seed=seed if not isinstance(
                seed, torch.Generator) else 0)
            vectors = spectrum.vectors
            extra["eigenvalues"] = [float(v) for v in spectrum.values]
            # the eigenvectors live on the trainable parameters; frozen ones do not move
            trainable = objective.params()
            dtype = flatten(theta).dtype
            out = []
            for i in range(dims):
                moving = unflatten(vectors[i].to(dtype), trainable)
                out.append({k: moving[k] if k in moving else torch.zeros_like(v)
                            for k, v in theta.items()})
            return out, "top Hessian eigenvectors (unit norm)", extra
        if directions == "pca":
            if not trajectory or len(trajectory) < 2:
                raise ConfigError("directions='pca' needs trajectory= (at least 2 checkpoints: "
                                  "models or parameter dicts along training).")
            points = torch.stack([flatten(_as_params(t, theta, f"trajectory[{i}]"))
                                  for i, t in enumerate(trajectory)])
            centered = points - flatten(theta)
            _, singular, right = torch.linalg.svd(centered.double(), full_matrices=False)
            if right.shape[0] < dims:
                raise ConfigError(f"the trajectory spans only {right.shape[0]} directions; "
                                  f"dims={dims} needs more checkpoints.")
            variance = singular ** 2
            out, coords = [], []
            for i in range(dims):
                unit = right[i].to(centered.dtype)
                projection = centered @ unit
                extent = float(projection.abs().max()) or 1.0
                out.append(unflatten(unit * extent, theta))
                coords.append((projection / extent).tolist())
            extra["trajectory"] = tuple(zip(*coords))
            extra["explained_variance"] = tuple(float(v) for v in (variance / variance.sum())[:dims])
            return out, "PCA of the trajectory", extra
        raise ConfigError(f"directions must be 'filter', 'pca', 'hessian', a tuple of models or "
                          f"tensors; got {directions!r}.")
    items = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    if len(items) > dims:
        raise ConfigError(f"got {len(items)} directions for a {dims}-D slice.")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            out.append(sub(_as_params(item, theta, f"directions[{i}]"), theta))
        else:
            out.append(_as_params(item, theta, f"directions[{i}]"))
    kinds = ["toward model" if isinstance(d, nn.Module) else "given" for d in items]
    while len(out) < dims:
        out.append(random_direction(theta, normalization="filter", ignore="biasbn", seed=gen))
        kinds.append("filter-normalised Gaussian")
    return out, " / ".join(kinds), extra


def landscape_slice(model: nn.Module | Objective, data: Any = None, *,
                    directions: Any = "filter", dims: int = 2,
                    span: float | tuple[float, float] = 1.0, points: int = 21,
                    loss: str | LossFn = "cross_entropy", seed: Any = 0,
                    trajectory: Sequence[Any] | None = None, reset_bn: Any = None,
                    metrics: Sequence[str] = ("loss", "accuracy"), batch_size: int | None = None,
                    progress: bool = False) -> SliceResult:
    """The loss on a line or plane through θ: L(θ + x d1) or L(θ + x d1 + y d2).

    Parameters
    ----------
    model : nn.Module or Objective
    data : (inputs, targets), Dataset or DataLoader; omit with an Objective.
    directions : "filter", "pca", "hessian", tuple of models / parameter dicts / flat tensors
        ``"filter"``: Gaussian directions, each filter (row / output channel) rescaled to
        the norm of the matching filter of θ, biases and norm-layer parameters zeroed
        (Li et al. 2018). ``"pca"``: principal directions of ``trajectory`` around θ, each
        scaled so that the trajectory spans [−1, 1]. ``"hessian"``: the top ``dims``
        Hessian eigenvectors (unit norm; needs ``ridgeline.curvature``) of the trainable
        parameters, zero on frozen ones (``requires_grad=False``). A model m gives
        the direction θ_m − θ (so m sits at coordinate 1); a dict or flat tensor is used as
        it is. Missing directions are filled with filter-normalised Gaussians.
    dims : {1, 2}
    span : float or (low, high)
        Coordinates run over [−span, span] (or [low, high]) on each axis.
    points : int
        Points per axis (``points²`` evaluations in 2-D).
    seed : int or torch.Generator
    trajectory : sequence of models or parameter dicts, for ``directions="pca"``.
    reset_bn : data, optional
        Re-estimate BatchNorm statistics at every point (see :func:`interpolate`).

    Returns
    -------
    SliceResult

    References
    ----------
    Li, Xu, Taylor, Studer & Goldstein (2018), "Visualizing the loss landscape of neural
    nets", NeurIPS.
    """
    if dims not in (1, 2):
        raise ConfigError(f"dims must be 1 or 2, got {dims}.")
    if points < 2:
        raise ConfigError(f"points must be at least 2, got {points}.")
    low, high = (-float(span), float(span)) if isinstance(span, (int, float)) else map(float, span)
    if not low < high:
        raise ConfigError(f"span must give low < high, got ({low}, {high}).")
    objective = as_objective(model, data, loss=loss, batch_size=batch_size)
    engine = PathEngine(objective, accuracy="accuracy" in metrics, reset_data=reset_bn,
                        batch_size=batch_size)
    theta, buffers = all_parameters(objective.model), named_buffers(objective.model)
    found, description, extra = slice_directions(objective, directions, dims, seed=seed,
                                                 trajectory=trajectory)
    axis = [low + (high - low) * i / (points - 1) for i in range(points)]
    coords = [(x, 0.0) for x in axis] if dims == 1 else [(x, y) for y in axis for x in axis]
    d1, d2 = found[0], (found[1] if dims == 2 else None)
    losses, accs = [], []
    with progress_bar(len(coords), "landscape slice", progress) as bar:
        for x, y in coords:
            point = {k: v + x * d1[k] + (y * d2[k] if d2 is not None else 0.0)
                     for k, v in theta.items()}
            loss_value, acc = engine.evaluate(point, buffers)
            losses.append(loss_value)
            accs.append(acc)
            bar.advance()
    center_loss = engine.evaluate(theta, buffers)[0]
    nonfinite = sum(1 for v in losses if not math.isfinite(v))

    def shape(values: list) -> tuple:
        if dims == 1:
            return tuple(values)
        return tuple(tuple(values[j * points:(j + 1) * points]) for j in range(points))

    return SliceResult(dims, tuple(axis), tuple(axis) if dims == 2 else None, shape(losses),
                       shape(accs) if engine.accuracy else None, description,
                       tuple(float(norm_of(d)) for d in found), center_loss,
                       extra.get("trajectory"), extra.get("explained_variance"), nonfinite,
                       tuple(extra["eigenvalues"]) if "eigenvalues" in extra else None)


def norm_of(direction: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in direction.values())))


slice = landscape_slice  # noqa: A001 - the public name of the instrument
