"""How much of the gradient lies in the top Hessian eigenspace (Gur-Ari et al. 2018)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ridgeline.curvature.operators import ParamFilter, as_operator
from ridgeline.curvature.spectrum import Spectrum, top_eigenvalues
from ridgeline.errors import ConfigError
from ridgeline.objective import Objective
from ridgeline.params import flatten

__all__ = ["GradientOverlap", "gradient_overlap"]


@dataclass(frozen=True)
class GradientOverlap:
    """Fraction of ‖g‖² in the span of the top-k Hessian eigenvectors.

    Attributes
    ----------
    value : float
        ‖V_kᵀ g‖² / ‖g‖² ∈ [0, 1].
    k : int
    per_direction : tuple of float
        (v_iᵀ g)² / ‖g‖² for each eigenvector, largest eigenvalue first.
    eigenvalues : tuple of float
    grad_norm : float
    converged : bool
        Whether the eigenvectors met their residual tolerance.
    matvecs : int
    notes : tuple of str
    """

    value: float
    k: int
    per_direction: tuple[float, ...]
    eigenvalues: tuple[float, ...]
    grad_norm: float
    converged: bool
    matvecs: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"value": self.value, "k": self.k, "per_direction": list(self.per_direction),
                "eigenvalues": list(self.eigenvalues), "grad_norm": self.grad_norm,
                "converged": self.converged, "matvecs": self.matvecs, "notes": list(self.notes)}

    def plot(self, ax=None):
        """Cumulative fraction of ‖g‖² against the number of top eigenvectors."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(5, 3.5)
        cumulative = torch.tensor(self.per_direction).cumsum(0).numpy()
        ax.plot(range(1, len(cumulative) + 1), cumulative, "o-")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("top-k eigenvectors")
        ax.set_ylabel("fraction of ‖g‖²")
        return ax


def gradient_overlap(model_or_objective: nn.Module | Objective, data: Any = None, k: int = 10,
                     *, tol: float = 1e-3, max_iter: int | None = None,
                     seed: int | torch.Generator | None = 0,
                     loss: str | Callable = "cross_entropy", param_filter: ParamFilter = None,
                     spectrum: Spectrum | None = None, progress: bool | None = False,
                     **objective_options: Any) -> GradientOverlap:
    """Fraction of the squared gradient norm in the top-k Hessian eigenspace.

    overlap = ‖V_kᵀ g‖² / ‖g‖² = Σ_{i≤k} (v_iᵀ g)² / ‖g‖², with g = ∇L(θ) and v_i the
    eigenvectors of the k largest Hessian eigenvalues. Gur-Ari et al. observed that after
    a short transient the gradient lies mostly in this subspace, with k the number of
    classes.

    Parameters
    ----------
    k : int
    tol, max_iter, seed : Lanczos settings (see :func:`top_eigenvalues`)
    spectrum : Spectrum, optional
        Reuse eigenvectors already computed at the same parameters (at least k of them).

    References
    ----------
    Gur-Ari, Roberts & Dyer (2018), "Gradient descent happens in a tiny subspace".
    """
    operator = as_operator(model_or_objective, data, loss=loss, param_filter=param_filter,
                           **objective_options)
    if spectrum is None:
        spectrum = top_eigenvalues(operator, k=k, tol=tol, max_iter=max_iter, seed=seed,
                                   progress=progress)
    if spectrum.vectors is None or spectrum.vectors.shape[0] < k:
        have = 0 if spectrum.vectors is None else spectrum.vectors.shape[0]
        raise ConfigError(f"the spectrum holds {have} eigenvectors but k={k}; compute it with "
                          f"top_eigenvalues(..., k≥{k}, vectors=True).")
    if tuple(spectrum.param_names) != operator.param_names:
        raise ConfigError("the spectrum was computed over different parameters than the "
                          "gradient; use the same param_filter for both.")
    gradient = operator.objective.grad(operator.point)
    g = flatten({name: gradient[name] for name in operator.param_names}).to(spectrum.vectors.dtype)
    total = float(g.pow(2).sum())
    if total == 0.0:
        raise ConfigError("the gradient is exactly zero; the overlap is undefined.")
    projections = (spectrum.vectors[:k] @ g).double().pow(2) / total
    return GradientOverlap(value=float(projections.sum()), k=k,
                           per_direction=tuple(projections.tolist()),
                           eigenvalues=tuple(spectrum.values[:k].tolist()),
                           grad_norm=total ** 0.5, converged=spectrum.converged,
                           matvecs=spectrum.matvecs, notes=operator.notes)
