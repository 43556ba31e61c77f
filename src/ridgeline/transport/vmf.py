"""Sampling the von Mises–Fisher distribution on the sphere (Wood 1994), in torch."""

from __future__ import annotations

import math

import torch

from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.transport.inputs import check_number
from ridgeline.transport.projections import check_count, generator_for

__all__ = ["vmf_directions", "vmf_base", "householder_to", "move_axis", "check_kappa"]

_MAX_ROUNDS = 10_000


def _cosines(d: int, kappa: float, count: int, gen: torch.Generator) -> torch.Tensor:
    """w = θᵀμ for ``count`` vMF(μ, κ) draws on S^{d−1}, d ≥ 2, by Wood's rejection sampler.

    b = (d−1)/(2κ + √(4κ² + (d−1)²)), x₀ = (1−b)/(1+b), c = κx₀ + (d−1) log(1 − x₀²);
    propose Z ~ Beta((d−1)/2, (d−1)/2), w = (1 − (1+b)Z)/(1 − (1−b)Z) and accept when
    κw + (d−1) log(1 − x₀w) − c ≥ log U, U ~ U(0, 1). Z = A/(A+B) with A, B ~ χ²_{d−1}
    built from Gaussians, so every draw comes from ``gen``. Float64 throughout.
    """
    f64 = torch.float64
    k = d - 1
    b = k / (2 * kappa + math.sqrt(4 * kappa ** 2 + k ** 2))
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + k * math.log1p(-x0 * x0)
    out = torch.empty(count, dtype=f64, device=gen.device)
    pending = torch.arange(count, device=gen.device)
    for _ in range(_MAX_ROUNDS):
        size = pending.numel()
        chi = torch.randn(2, size, k, generator=gen, device=gen.device, dtype=f64).square().sum(-1)
        z = chi[0] / (chi[0] + chi[1])
        w = (1 - (1 + b) * z) / (1 - (1 - b) * z)
        u = torch.rand(size, generator=gen, device=gen.device, dtype=f64)
        accept = kappa * w + k * torch.log1p(-x0 * w) - c >= torch.log(u)
        out[pending[accept]] = w[accept]
        pending = pending[~accept]
        if pending.numel() == 0:
            return out.clamp(-1.0, 1.0)
    raise RuntimeError("vMF rejection sampling did not finish; this should not happen for "
                       f"finite kappa (kappa={kappa}, d={d}).")  # pragma: no cover


def vmf_base(d: int, kappa: float, L: int, gen: torch.Generator) -> torch.Tensor:
    """L draws of vMF(e₁, κ) on S^{d−1}: θ = (w, √(1−w²) v), v uniform on S^{d−2}.

    For d = 1 the sphere is {−1, +1} and P(θ = +1) = e^κ / (e^κ + e^{−κ}). Returns (L, d)
    in float64.
    """
    f64 = torch.float64
    if d == 1:
        plus = torch.rand(L, generator=gen, device=gen.device, dtype=f64) < torch.sigmoid(
            torch.tensor(2.0 * kappa, dtype=f64))
        return torch.where(plus, 1.0, -1.0).to(f64).unsqueeze(-1)
    w = _cosines(d, kappa, L, gen)
    v = torch.randn(L, d - 1, generator=gen, device=gen.device, dtype=f64)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(f64).tiny)
    return torch.cat([w.unsqueeze(-1), (1 - w * w).clamp_min(0).sqrt().unsqueeze(-1) * v], -1)


def move_axis(base: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Apply the orthogonal map R = −(I − 2uuᵀ), u = (s + t)/‖s + t‖, which sends the unit
    vector s = ``source`` to t = ``target`` (R s = t), to every row of ``base``.

    Unlike the Householder reflection I − 2vvᵀ with v = (s − t)/‖s − t‖, whose direction v
    is undefined at t = s (so its derivative in t vanishes there and an optimiser started
    at t = s never moves), R is smooth in t everywhere except at the antipode t = −s,
    where the plain reflection (well defined there, R s = −s) is used. Samples of vMF(s, κ)
    become samples of vMF(t, κ), since vMF(s, κ) is invariant under every orthogonal map
    that fixes s.

    Parameters
    ----------
    base : Tensor (L, d) or (..., L, d)
    source, target : Tensor (..., d), unit norm

    Returns
    -------
    Tensor (..., L, d)
    """
    u = source + target
    norm = u.norm(dim=-1, keepdim=True)
    antipode = norm <= 1e-12
    safe = torch.where(antipode, torch.ones_like(norm), norm)
    u = torch.where(antipode, source, u / safe).unsqueeze(-2)       # (..., 1, d)
    sign = torch.where(antipode, 1.0, -1.0).to(base.dtype).unsqueeze(-2)
    return sign * (base - 2 * (base * u).sum(-1, keepdim=True) * u)


def householder_to(base: torch.Tensor, mean_direction: torch.Tensor) -> torch.Tensor:
    """Carry samples around e₁ onto samples around μ: :func:`move_axis` from e₁ to μ,
    R = −(I − 2uuᵀ), u = (e₁ + μ)/‖e₁ + μ‖, so R e₁ = μ; differentiable in μ everywhere
    but μ = −e₁ (the reparameterisation of v-DSW).

    Parameters
    ----------
    base : Tensor (L, d) or (..., L, d)
    mean_direction : Tensor (..., d), unit norm

    Returns
    -------
    Tensor (..., L, d)
    """
    e1 = torch.zeros_like(mean_direction)
    e1[..., 0] = 1
    return move_axis(base, e1, mean_direction)


def check_kappa(kappa: float) -> float:
    """The vMF concentration: a finite number ≥ 0."""
    return check_number(kappa, "kappa", minimum=0)


def vmf_directions(mean_direction: torch.Tensor, kappa: float, L: int,
                   seed: int | torch.Generator | None = None) -> torch.Tensor:
    """L directions from the von Mises–Fisher distribution vMF(μ, κ) on S^{d−1}.

    Density ∝ exp(κ μᵀθ) on the unit sphere: κ = 0 is uniform, κ → ∞ concentrates on μ.
    The cosine w = μᵀθ is drawn by Wood's (1994) rejection sampler, the remaining
    direction uniformly, and e₁ is mapped to μ by a Householder reflection (so samples are
    differentiable in μ for fixed randomness).

    Parameters
    ----------
    mean_direction : Tensor (d,) or (..., d)
        The mean direction μ (normalised here).
    kappa : float ≥ 0
        Concentration.
    L : int
        Number of directions (shared randomness across batch entries).
    seed : int, torch.Generator or None

    Returns
    -------
    Tensor (..., L, d)
        Unit vectors, in the dtype and device of ``mean_direction``.

    References
    ----------
    Wood (1994), "Simulation of the von Mises Fisher distribution", Comm. Stat. Simul.
    Comput. 23(1); Nguyen et al. (2021), "Improving relational regularized autoencoders
    with spherical sliced fused Gromov Wasserstein", ICLR.
    """
    if not isinstance(mean_direction, torch.Tensor):
        mean_direction = torch.as_tensor(mean_direction, dtype=torch.get_default_dtype())
    if mean_direction.dim() == 0 or mean_direction.shape[-1] == 0:
        raise ShapeMismatchError(f"mean_direction must have shape (d,) or (..., d); got "
                                 f"{tuple(mean_direction.shape)}.")
    kappa = check_kappa(kappa)
    norm = mean_direction.norm(dim=-1, keepdim=True)
    if not bool(torch.isfinite(mean_direction).all()) or bool((norm == 0).any()):
        raise ConfigError("mean_direction must be a finite non-zero vector.")
    mu = mean_direction / norm
    d = mu.shape[-1]
    base = vmf_base(d, kappa, check_count(L, "L"), generator_for(seed))
    return householder_to(base.to(device=mu.device, dtype=mu.dtype), mu)
