"""The merge rules on named tensors: weighted and Fisher-weighted averages, task
arithmetic, TIES and DARE. Pure functions of parameter dicts; they know nothing of models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ridgeline.params import Params

__all__ = ["weighted_average", "fisher_average", "task_arithmetic", "ties", "dare",
           "trim_top", "task_vectors"]

State = Mapping[str, torch.Tensor]


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> Params:
    """Σ_i w_i θ_i / Σ_i w_i, tensor by tensor.

    Computed as θ_1 + Σ_i (w_i / Σw)(θ_i − θ_1), which is the same number up to rounding
    and returns θ_1 bit for bit when every θ_i equals it. Integer tensors (counters) are
    taken from the first state.
    """
    total = float(sum(weights))
    out: Params = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = torch.zeros_like(first)
        for state, w in zip(states[1:], weights[1:]):
            acc += (w / total) * (state[name] - first)
        out[name] = first + acc
    return out


def fisher_average(states: Sequence[State], fishers: Sequence[State], weights: Sequence[float],
                   *, eps: float = 0.0) -> tuple[Params, int]:
    """θ = Σ_i w_i F_i θ_i / Σ_i w_i F_i elementwise (Matena & Raffel 2022, eq. 3).

    Where Σ_i w_i F_i ≤ ``eps`` (the Fisher vanishes: a dead unit, an unused input) the
    plain weighted average Σ w_i θ_i / Σ w_i is used instead. Computed relative to θ_1 as
    in :func:`weighted_average`. Returns (merged tensors, how many entries fell back).
    """
    plain = weighted_average(states, weights)
    out: Params = {}
    fallback = 0
    for name, first in states[0].items():
        if name not in fishers[0] or not first.is_floating_point():
            out[name] = plain[name]
            continue
        denominator = sum(w * f[name] for w, f in zip(weights, fishers))
        numerator = torch.zeros_like(first)
        for state, fisher, w in zip(states[1:], fishers[1:], weights[1:]):
            numerator += w * fisher[name] * (state[name] - first)
        vanishing = denominator <= eps
        fallback += int(vanishing.sum())
        merged = first + numerator / torch.where(vanishing, torch.ones_like(denominator),
                                                 denominator)
        out[name] = torch.where(vanishing, plain[name], merged)
    return out, fallback


def task_vectors(states: Sequence[State], base: State) -> list[Params]:
    """τ_i = θ_i − θ_base for every floating tensor."""
    return [{k: state[k] - v for k, v in base.items() if v.is_floating_point()}
            for state in states]


def task_arithmetic(base: State, vectors: Sequence[State], weights: Sequence[float],
                    scale: float) -> Params:
    """θ_base + scale · Σ_i w_i τ_i (Ilharco et al. 2023, "Editing models with task
    arithmetic")."""
    out: Params = {}
    for name, theta in base.items():
        if name not in vectors[0]:
            out[name] = theta.clone()
            continue
        total = torch.zeros_like(theta)
        for vector, w in zip(vectors, weights):
            total += w * vector[name]
        out[name] = theta + scale * total
    return out


def _kept(numel: int, density: float) -> int:
    """k = ⌈density · n⌉ entries (at least one, at most n)."""
    return min(numel, max(1, math.ceil(density * numel - 1e-9)))


def trim_top(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ⌈density · n⌉ largest-magnitude entries set to zero."""
    flat = tensor.reshape(-1)
    k = _kept(flat.numel(), density)
    if k >= flat.numel():
        return tensor.clone()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tensor)


def ties(base: State, vectors: Sequence[State], weights: Sequence[float], *, density: float,
         scale: float) -> Params:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    Per tensor: τ̂_i keeps the ⌈density · n⌉ entries of τ_i largest in magnitude (the rest
    are zero); the elected sign is γ = sgn(Σ_i w_i τ̂_i); the merged task vector averages,
    entry by entry, only the τ̂_i that are non-zero and agree with γ,

        τ = Σ_i w_i [sgn τ̂_i = γ ≠ 0] τ̂_i / Σ_i w_i [sgn τ̂_i = γ ≠ 0]   (0 where none agree),

    and θ = θ_base + scale · τ.
    """
    out: Params = {}
    for name, theta in base.items():
        if name not in vectors[0]:
            out[name] = theta.clone()
            continue
        trimmed = torch.stack([trim_top(v[name], density) for v in vectors])
        w = torch.as_tensor(list(weights), dtype=theta.dtype, device=theta.device).view(
            (-1,) + (1,) * theta.dim())
        elected = torch.sign((w * trimmed).sum(0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = (w * agree).sum(0)
        total = (w * agree * trimmed).sum(0)
        merged = torch.where(count > 0, total / torch.where(count > 0, count, 1), 0)
        out[name] = theta + scale * merged
    return out


def dare(base: State, vectors: Sequence[State], weights: Sequence[float], *, density: float,
         scale: float, generator: torch.Generator) -> Params:
    """DARE (Yu et al. 2024, "Language models are Super Mario"): drop and rescale.

    Each entry of each τ_i is kept with probability p = ``density`` and divided by p,
    τ̃_i = m_i ⊙ τ_i / p with m_i ~ Bernoulli(p), so E[τ̃_i] = τ_i; then
    θ = θ_base + scale · Σ_i w_i τ̃_i (task arithmetic on the sparsified vectors).
    The masks are drawn on the CPU from ``generator`` in a fixed order (same seed, same
    merge on every device).
    """
    dropped = []
    for vector in vectors:
        sparse = {}
        for name, tau in vector.items():
            mask = torch.rand(tau.shape, generator=generator) < density
            sparse[name] = torch.where(mask.to(tau.device), tau / density, torch.zeros_like(tau))
        dropped.append(sparse)
    return task_arithmetic(base, dropped, weights, scale)
