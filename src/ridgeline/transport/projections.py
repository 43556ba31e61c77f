"""Directions on the unit sphere and projections of point clouds onto them."""

from __future__ import annotations

import operator

import torch

from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.params import make_generator

__all__ = ["random_directions", "project", "generator_for", "resolve_directions",
           "check_count"]


def generator_for(seed: int | torch.Generator | None) -> torch.Generator:
    """A generator for ``seed``: the generator itself, or a CPU generator seeded with it.

    Directions are drawn on the generator's device (CPU for an int seed) and then moved,
    so an int seed gives the same directions on every device.
    """
    return make_generator(seed, "cpu")


def random_directions(d: int, L: int, seed: int | torch.Generator | None = None, *,
                      dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """L independent directions drawn uniformly from the unit sphere S^{d-1}.

    θ = z / ‖z‖ with z ~ N(0, I_d), which is uniform on the sphere by rotation invariance
    of the standard Gaussian (Muller 1959).

    Parameters
    ----------
    d : int
        Dimension of the ambient space.
    L : int
        Number of directions.
    seed : int, torch.Generator or None
        Same seed, same directions, on every device.
    dtype, device : optional
        Of the returned tensor (default: the default dtype, CPU).

    Returns
    -------
    Tensor (L, d)
        One unit direction per row.
    """
    if int(d) < 1 or int(L) < 1:
        raise ConfigError(f"random_directions needs d ≥ 1 and L ≥ 1; got d={d}, L={L}.")
    gen = generator_for(seed)
    # Drawn in float32 whatever the dtype, so a seed gives the same directions in every
    # dtype; normalised after the cast so they are unit vectors to the dtype's precision.
    z = torch.randn(int(L), int(d), generator=gen, device=gen.device, dtype=torch.float32)
    z = z.to(device=device or gen.device, dtype=dtype or torch.get_default_dtype())
    return z / z.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


def project(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Project a point cloud onto directions: one 1-D point cloud per direction.

    P[..., l, i] = ⟨θ_l, x_i⟩, the pushforward θ_l#μ of the empirical measure of x
    (Bonneel et al. 2015, the Radon transform of a discrete measure).

    Parameters
    ----------
    x : Tensor (..., n, d)
    directions : Tensor (L, d) or (..., L, d)
        Leading dimensions broadcast against those of ``x``.

    Returns
    -------
    Tensor (..., L, n)
        Row l holds the n projected points on direction l (contiguous, ready for sorting).
    """
    if x.dim() < 2 or directions.dim() < 2:
        raise ShapeMismatchError(f"project needs points (..., n, d) and directions (..., L, d); "
                                 f"got shapes {tuple(x.shape)} and {tuple(directions.shape)}.")
    if x.shape[-1] != directions.shape[-1]:
        raise ShapeMismatchError(f"points have d={x.shape[-1]} coordinates but directions have "
                                 f"{directions.shape[-1]}; they must match.")
    return torch.matmul(directions.to(x.dtype), x.transpose(-1, -2))


def resolve_directions(projections: int | torch.Tensor, d: int,
                       seed: int | torch.Generator | None, *, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """Directions from ``projections``: a count L (drawn uniformly with ``seed``) or the
    directions themselves, a tensor (L, d) or (..., L, d) of unit vectors."""
    if isinstance(projections, torch.Tensor):
        directions = projections.to(device=device, dtype=dtype)
        if directions.dim() < 2 or directions.shape[-1] != d or directions.shape[-2] == 0:
            raise ShapeMismatchError(f"projections given as directions must have shape (L, d) "
                                     f"with d={d} and L ≥ 1; got {tuple(directions.shape)}.")
        if not bool(torch.isfinite(directions).all()):
            raise ConfigError("projections (directions) contain NaN or infinite values.")
        norms = directions.detach().norm(dim=-1)
        if bool(((norms - 1).abs() > 1e-3).any()):
            raise ConfigError(f"projections must be unit vectors; norms range over "
                              f"[{float(norms.min()):.4g}, {float(norms.max()):.4g}]. Normalise "
                              "them: directions / directions.norm(dim=-1, keepdim=True).")
        return directions
    return random_directions(d, check_count(projections, "projections"), seed, dtype=dtype,
                             device=device)


def check_count(value: object, name: str) -> int:
    """A positive integer option (a number of directions, steps, repeats)."""
    try:
        count = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        count = None
    if isinstance(value, bool) or count is None or count < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}.")
    return count
