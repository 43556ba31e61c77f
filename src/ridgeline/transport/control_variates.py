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

__all__ = ["control_variate", "control_variate_terms", "combine", "weighted_mean", "MIN_FIT",
           "JACKKNIFE_MAX"]


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


MIN_FIT = 4
"""Fewest directions γ is fitted on: with fewer the slope Cov/Var has infinite variance
(the sample variance of G has too few degrees of freedom to stay away from 0)."""

JACKKNIFE_MAX = 64
"""Up to this many directions the standard error is the jackknife's (O(L²) work)."""


def combine(values: torch.Tensor, controls: torch.Tensor | None = None,
            expected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean of per-direction values, optionally with a cross-fitted control variate.

    Plain: Ŝ = (1/L) Σ_l W_l, se = sd(W)/√L.

    Control variate, cross-fitted (leave one out): Ŝ = (1/L) Σ_l [W_l − γ_{−l}(G_l − E G)]
    with γ_{−l} = Cov(W, G)/Var(G) estimated from the other L − 1 draws. γ_{−l} is
    independent of (W_l, G_l) and E G_l = E G, so every term has expectation E W and the
    estimate is unbiased for every L (fitting γ on the draws it corrects, as in
    Glasserman 2004 §4.1, biases it by O(1/L): −7 % at L = 5 for the upper variate on a
    Gaussian pair in d = 8). γ needs at least ``MIN_FIT`` = 4 other draws (L ≥ 5); below
    that, and wherever G does not vary on them (d = 1, or Δm = 0 for the lower variate),
    γ = 0 and Ŝ is the plain mean.

    Standard error of the control-variate estimate: for L ≤ ``JACKKNIFE_MAX`` = 64 the
    jackknife over directions, se² = (L−1)/L Σ_j (Ŝ_(−j) − Ŝ_(·))², with each Ŝ_(−j) the
    same cross-fitted estimate on the other L − 1 draws (γ from L − 2 ≥ 3 of them) — the
    terms W_l − γ_{−l}(G_l − E G) are positively correlated through the shared fits, so
    sd/√L of them is too small at small L, while the jackknife is conservative (Efron &
    Stein 1981); for larger L, sd(W_l − γ_{−l}(G_l − E G))/√L. Measured over 3000 seeds
    on two Gaussian pairs in d = 8 (both variates), ±2 se covers the truth 92–94 % of the
    time at L = 5 (plain Monte Carlo: 81–85 %, a t-distribution with 4 degrees of
    freedom), 90–92 % at L = 10 and 94–95 % at L = 100. A weak control (the lower variate
    when Δm is small against the spread) can make the estimate noisier than plain Monte
    Carlo at very small L (11× the variance at L = 5, 1.3× at L = 10 in that test); its
    standard error says so. The standard error is NaN when L < 2.

    Parameters
    ----------
    values : Tensor (..., L)
    controls : Tensor (..., L), optional
    expected : Tensor (...), optional
        The exact expectation of ``controls``.

    Returns
    -------
    (estimate (...), stderr (...))

    References
    ----------
    Chernozhukov et al. (2018), "Double/debiased machine learning" (cross-fitting);
    Efron & Stein (1981), "The jackknife estimate of variance", Ann. Statist.
    """
    count = values.shape[-1]
    mean = values.mean(-1)
    if controls is None or count < MIN_FIT + 1:
        return mean, _stderr(values, count, dof_used=1)
    expected = torch.as_tensor(expected, dtype=values.dtype, device=values.device)
    scale = controls.detach().abs().amax(-1, keepdim=True)
    tiny = (64 * torch.finfo(values.dtype).eps * scale).square()
    w = values - values.mean(-1, keepdim=True)   # centring changes no slope, only rounding
    g = controls - controls.mean(-1, keepdim=True)
    sums = [t.sum(-1, keepdim=True) for t in (w, g, w * g, g * g)]
    gamma = _slopes([s - t for s, t in zip(sums, (w, g, w * g, g * g))], count - 1, tiny)
    terms = values - gamma * (controls - expected.unsqueeze(-1))
    estimate = terms.mean(-1)
    if count > JACKKNIFE_MAX:
        return estimate, _stderr(terms, count, dof_used=1)
    return estimate, _jackknife(values.detach(), controls.detach(), expected.detach(),
                                tiny.detach())


def _slopes(sums: list[torch.Tensor], fitted: int, tiny: torch.Tensor) -> torch.Tensor:
    """Cov/Var from the sums of (w, g, wg, g²) over ``fitted`` draws; 0 where G is flat."""
    sum_w, sum_g, sum_wg, sum_gg = sums
    mean_g = sum_g / fitted
    var = sum_gg / fitted - mean_g.square()
    cov = sum_wg / fitted - (sum_w / fitted) * mean_g
    varies = var.detach() > tiny
    return torch.where(varies, cov / torch.where(varies, var, torch.ones_like(var)),
                       torch.zeros_like(var))


def _jackknife(values: torch.Tensor, controls: torch.Tensor, expected: torch.Tensor,
               tiny: torch.Tensor) -> torch.Tensor:
    """Jackknife standard error of the cross-fitted estimate; pairs (j left out, l used)."""
    count = values.shape[-1]
    w = values - values.mean(-1, keepdim=True)
    g = controls - controls.mean(-1, keepdim=True)
    wj, gj, wl, gl = w.unsqueeze(-1), g.unsqueeze(-1), w.unsqueeze(-2), g.unsqueeze(-2)
    sums = [t.sum(-1, keepdim=True).unsqueeze(-1) for t in (w, g, w * g, g * g)]
    gamma = _slopes([sums[0] - wj - wl, sums[1] - gj - gl, sums[2] - wj * gj - wl * gl,
                     sums[3] - gj * gj - gl * gl], count - 2, tiny.unsqueeze(-1))
    if count - 2 < MIN_FIT - 1:
        gamma = torch.zeros_like(gamma)
    terms = values.unsqueeze(-2) - gamma * (controls - expected.unsqueeze(-1)).unsqueeze(-2)
    left_out = torch.eye(count, dtype=torch.bool, device=values.device)
    replicates = terms.masked_fill(left_out, 0).sum(-1) / (count - 1)      # Ŝ_(−j), (..., L)
    spread = (replicates - replicates.mean(-1, keepdim=True)).square().sum(-1)
    return ((count - 1) / count * spread).sqrt()


def _stderr(samples: torch.Tensor, count: int, dof_used: int) -> torch.Tensor:
    if count <= dof_used:
        return torch.full(samples.shape[:-1], math.nan, dtype=samples.dtype,
                          device=samples.device)
    samples = samples.detach()  # an error bar, not a quantity to differentiate
    centred = samples - samples.mean(-1, keepdim=True)
    return (centred.square().sum(-1) / (count - dof_used) / count).sqrt()
