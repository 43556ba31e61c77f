"""Riemannian gradient ascent on the unit sphere, for optimised slicing directions."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ridgeline.transport.inputs import PointClouds
from ridgeline.transport.projections import project, random_directions
from ridgeline.transport.wasserstein1d import wasserstein_1d_power

__all__ = ["sphere_ascent", "initial_direction", "geodesic_step", "projected_power"]

Objective = Callable[[torch.Tensor], torch.Tensor]


def projected_power(clouds: PointClouds, directions: torch.Tensor, p: float) -> torch.Tensor:
    """W_p^p(θ#μ, θ#ν) for directions (..., K, d): values (..., K)."""
    wx = None if clouds.weights_x is None else clouds.weights_x.unsqueeze(-2)
    wy = None if clouds.weights_y is None else clouds.weights_y.unsqueeze(-2)
    return wasserstein_1d_power(project(clouds.x, directions), project(clouds.y, directions),
                                p=p, weights_u=wx, weights_v=wy)


def geodesic_step(theta: torch.Tensor, tangent: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Move along the great circle from θ towards the unit tangent u by ``angle``:
    exp_θ(α u) = cos(α) θ + sin(α) u, renormalised against rounding."""
    moved = torch.cos(angle) * theta + torch.sin(angle) * tangent
    return moved / moved.norm(dim=-1, keepdim=True)


def _value_and_grad(objective: Objective, theta: torch.Tensor):
    with torch.enable_grad():
        theta = theta.detach().requires_grad_(True)
        value = objective(theta)
        (grad,) = torch.autograd.grad(value.sum(), theta)
    return value.detach(), grad.detach()


def sphere_ascent(objective: Objective, theta: torch.Tensor, *, steps: int, lr: float,
                  tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Maximise ``objective`` over unit vectors by projected (Riemannian) gradient ascent.

    The Euclidean gradient g is projected on the tangent space, g_T = g − (gᵀθ)θ, and θ
    moves along the geodesic in the direction g_T/‖g_T‖ by an angle α (radians, starting
    at ``lr``). A step that does not increase the objective is rejected and α halved;
    an accepted step grows α by 1.5 (at most π/2). The values are therefore monotone and
    each pair of a batch adapts its own step. Absil, Mahony & Sepulchre (2008), §4.

    Parameters
    ----------
    objective : callable θ (..., d) -> values (...)
        Deterministic and differentiable in θ.
    theta : Tensor (..., d)
        Unit starting directions.
    steps : int
        Gradient evaluations at most.
    lr : float
        Initial step angle in radians.
    tol : float
        Stop when every step angle has shrunk below ``tol``.

    Returns
    -------
    (theta (..., d), value (...), steps taken)
    """
    value, grad = _value_and_grad(objective, theta)
    angle = torch.full(value.shape, float(lr), dtype=theta.dtype, device=theta.device)
    taken = 0
    for taken in range(1, steps + 1):  # noqa: B007 - the count is returned
        tangent = grad - (grad * theta).sum(-1, keepdim=True) * theta
        norm = tangent.norm(dim=-1, keepdim=True)
        unit = tangent / norm.clamp_min(torch.finfo(theta.dtype).tiny)
        candidate = geodesic_step(theta, unit, angle.unsqueeze(-1))
        cand_value, cand_grad = _value_and_grad(objective, candidate)
        better = (cand_value > value) & (norm.squeeze(-1) > 0)
        theta = torch.where(better.unsqueeze(-1), candidate, theta)
        grad = torch.where(better.unsqueeze(-1), cand_grad, grad)
        value = torch.where(better, cand_value, value)
        angle = torch.where(better, (angle * 1.5).clamp_max(math.pi / 2), angle * 0.5)
        if bool((angle < tol).all()):
            break
    return theta, value, taken


def initial_direction(clouds: PointClouds, p: float, draws: int,
                      seed: int | torch.Generator | None) -> torch.Tensor:
    """The best start among ``draws`` uniform directions and the mean difference Δm/‖Δm‖:
    argmax of W_p^p(θ#μ, θ#ν), per pair. Returns (..., d)."""
    clouds = clouds.detach()
    x, y = clouds.x, clouds.y
    d = x.shape[-1]
    mean_x, mean_y = clouds.means()
    delta = mean_x - mean_y
    norm = delta.norm(dim=-1, keepdim=True)
    fallback = torch.zeros_like(delta)
    fallback[..., 0] = 1
    shift = torch.where(norm > 0, delta / norm.clamp_min(torch.finfo(x.dtype).tiny), fallback)
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    random = random_directions(d, draws, seed, dtype=x.dtype, device=x.device)
    candidates = torch.cat([random.expand(*batch, draws, d),
                            shift.expand(*batch, d).unsqueeze(-2)], dim=-2)
    best = projected_power(clouds, candidates, p).argmax(-1)
    index = best[..., None, None].expand(*best.shape, 1, d)
    return torch.gather(candidates, -2, index).squeeze(-2)
