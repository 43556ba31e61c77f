"""Gaussian control variates for Monte Carlo sliced Wasserstein (Nguyen & Ho, ICLR 2024).

For p = 2 each projected measure θ#μ is compared with the Gaussian having its mean and
variance. With Δm = m_x − m_y and Σ_x, Σ_y the (weighted) covariances of the clouds:

* lower: G(θ) = (θᵀΔm)² ≤ W_2²(θ#μ, θ#ν), with E_θ G = ‖Δm‖²/d;
* upper: G(θ) = (θᵀΔm)² + θᵀΣ_xθ + θᵀΣ_yθ ≥ W_2²(θ#μ, θ#ν), with
  E_θ G = (‖Δm‖² + tr Σ_x + tr Σ_y)/d,

both because E_θ θθᵀ = I/d for θ uniform on S^{d−1}. Covariances are never formed:
θᵀΣθ is the variance of the projected points and tr Σ = Σ_i w_i ‖x_i − m‖².
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ridgeline.errors import ConfigError
from ridgeline.transport.inputs import PointClouds, prepare_pair
from ridgeline.transport.projections import project

__all__ = ["control_variate", "control_variate_terms", "combine", "weighted_mean"]


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Σ_i w_i v_i along ``dim`` (the plain mean when ``weights`` is None)."""
    if weights is None:
        return values.mean(dim)
    return (values * weights).sum(dim)


def control_variate_terms(clouds: PointClouds, directions: torch.Tensor, kind: str,
                          projected: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """G(θ_l) for every direction and its exact expectation E_θ G (internal kernel).

    Parameters
    ----------
    clouds : PointClouds
    directions : Tensor (L, d) or (..., L, d)
    kind : {"lower", "upper"}
    projected : (Tensor (..., L, n), Tensor (..., L, m)), optional
        The clouds already projected on ``directions`` (reused for the upper variances).

    Returns
    -------
    (Tensor (..., L), Tensor (...))
    """
    x, y, wx, wy = clouds.x, clouds.y, clouds.weights_x, clouds.weights_y
    d = x.shape[-1]
    mean_x, mean_y = clouds.means()
    delta = mean_x - mean_y                                         # (..., d)
    directions = directions.to(x.dtype)
    shift = torch.matmul(directions, delta.unsqueeze(-1)).squeeze(-1)  # θᵀΔm, (..., L)
    values = shift.square()
    expected = delta.square().sum(-1) / d
    if kind == "lower":
        return values, expected
    px, py = projected if projected is not None else (project(x, directions), project(y, directions))
    for proj, weights, points, mean in ((px, wx, x, mean_x), (py, wy, y, mean_y)):
        w = None if weights is None else weights.unsqueeze(-2)
        centred = proj - weighted_mean(proj, w, -1).unsqueeze(-1)
        values = values + weighted_mean(centred.square(), w, -1)      # θᵀΣθ
        spread = (points - mean.unsqueeze(-2)).square().sum(-1)       # ‖x_i − m‖², (..., n)
        expected = expected + weighted_mean(spread, weights, -1) / d  # tr Σ / d
    return values, expected


def control_variate(x: Any, y: Any, directions: torch.Tensor, *, kind: str = "lower",
                    weights_x: Any = None, weights_y: Any = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian control variate G(θ) on given directions, and its exact mean E_θ G.

    lower: G(θ) = (θᵀΔm)², E G = ‖Δm‖²/d. upper: G(θ) = (θᵀΔm)² + θᵀΣ_xθ + θᵀΣ_yθ,
    E G = (‖Δm‖² + tr Σ_x + tr Σ_y)/d, for θ uniform on the sphere S^{d−1}.

    Parameters
    ----------
    x : Tensor (..., n, d)
    y : Tensor (..., m, d)
    directions : Tensor (L, d)
    kind : {"lower", "upper"}
    weights_x, weights_y : optional probability weights of the points.

    Returns
    -------
    values : Tensor (..., L)
    expectation : Tensor (...)

    References
    ----------
    Nguyen & Ho (2024), "Sliced Wasserstein Estimation with Control Variates", ICLR.
    """
    if kind not in ("lower", "upper"):
        raise ConfigError(f"kind must be 'lower' or 'upper'; got {kind!r}.")
    clouds = prepare_pair(x, y, weights_x, weights_y)
    values, expected = control_variate_terms(clouds, directions, kind)
    return values.to(clouds.out_dtype), expected.to(clouds.out_dtype)


def combine(values: torch.Tensor, controls: torch.Tensor | None = None,
            expected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean of per-direction values, optionally with a control variate.

    Plain: Ŝ = (1/L) Σ_l W_l, se = sd(W)/√L.
    Control variate: Ŝ = mean(W) − γ (mean(G) − E G) with γ = Cov(W, G)/Var(G) estimated
    from the same L draws (Glasserman 2004, §4.1), se = sd(W − γ G)/√L with L − 2 degrees
    of freedom. γ = 0 when G does not vary (e.g. d = 1, or Δm = 0 for the lower variate).
    The standard error is NaN when L is too small to estimate it (L < 2, or L < 3 with a
    control variate).

    Parameters
    ----------
    values : Tensor (..., L)
    controls : Tensor (..., L), optional
    expected : Tensor (...), optional
        The exact expectation of ``controls``.

    Returns
    -------
    (estimate (...), stderr (...))
    """
    count = values.shape[-1]
    mean = values.mean(-1)
    if controls is None:
        return mean, _stderr(values, count, dof_used=1)
    centred_g = controls - controls.mean(-1, keepdim=True)
    var_g = centred_g.square().mean(-1)
    cov = ((values - mean.unsqueeze(-1)) * centred_g).mean(-1)
    scale = controls.detach().abs().amax(-1)
    varies = var_g.detach() > (64 * torch.finfo(values.dtype).eps * scale).square()
    gamma = torch.where(varies, cov / torch.where(varies, var_g, torch.ones_like(var_g)),
                        torch.zeros_like(var_g))
    estimate = mean - gamma * (controls.mean(-1) - expected)
    return estimate, _stderr(values - gamma.unsqueeze(-1) * controls, count, dof_used=2)


def _stderr(samples: torch.Tensor, count: int, dof_used: int) -> torch.Tensor:
    if count <= dof_used:
        return torch.full(samples.shape[:-1], math.nan, dtype=samples.dtype,
                          device=samples.device)
    samples = samples.detach()  # an error bar, not a quantity to differentiate
    centred = samples - samples.mean(-1, keepdim=True)
    return (centred.square().sum(-1) / (count - dof_used) / count).sqrt()
