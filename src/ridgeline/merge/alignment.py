"""Bringing N networks into one permutation frame before they are merged: every model
aligned to a reference, then Git Re-Basin's MergeMany (each model re-aligned to the mean
of the others until no permutation changes)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ridgeline.connectivity import align as align_pair
from ridgeline.connectivity import permutation_spec, permute_model
from ridgeline.connectivity.alignment import weight_matching
from ridgeline.errors import ConfigError

from .combine import weighted_average

__all__ = ["align_many", "ManyAlignment", "matched_tensors", "MATCHING"]

MATCHING = ("matrices", "all")


@dataclass(frozen=True)
class ManyAlignment:
    """Aligned copies of the models (the reference unchanged unless MergeMany moved it),
    the permutation of each (unit i of the aligned model = unit perm[i] of the original),
    MergeMany rounds and whether they converged."""

    models: tuple[nn.Module, ...]
    permutations: tuple[dict[str, torch.Tensor], ...]
    rounds: int
    converged: bool
    notes: tuple[str, ...] = ()
    restarts: int | None = None  # weight matching's runs per model in step 1 (as used)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def matched_tensors(params: Mapping[str, torch.Tensor], spec: Any,
                    matching: str = "matrices") -> list[str]:
    """Names of the tensors that enter the weight-matching cost.

    ``"all"``: every permuted parameter, biases and normalisation scales included, as in
    Git Re-Basin's objective Σ_k ⟨θ_A,k, π(θ_B)_k⟩. ``"matrices"``: only tensors with two
    or more axes (linear and convolution weights, embeddings); a 1-D tensor (bias, norm
    scale or shift) enters only where a permutation acts on no matrix at all, so every
    permutation keeps a cost. Which tensors are matched changes the local optimum found,
    never the function of an aligned model: every parameter is still permuted.
    """
    if matching not in MATCHING:
        raise ConfigError(f"matching must be 'matrices' or 'all', got {matching!r}.")
    names = list(params)
    if matching == "all":
        return names
    kept = {k for k in names if params[k].dim() >= 2}
    covered = {p for k in kept for p in spec.axes.get(k, ()) if p is not None}
    return [k for k in names if k in kept
            or any(p is not None and p not in covered for p in spec.axes.get(k, ()))]


def depth_weights(params: Mapping[str, torch.Tensor], names: Sequence[str],
                  depth_weight: float) -> dict[str, float]:
    """α_k = r^(−l_k), r = ``depth_weight``, l_k the index of tensor k's layer: the number of
    tensors with two or more axes before it in parameter order (a bias or norm parameter
    counts with the matrix before it). On a chain (MLP, plain CNN) every permutation then
    weighs the incoming weights of its units r times more than their outgoing weights."""
    out, layer = {}, -1
    for k in params:
        if params[k].dim() >= 2:
            layer += 1
        if k in names:
            out[k] = float(depth_weight) ** (-max(layer, 0))
    return out


def align_many(models: Sequence[nn.Module], *, method: str = "weights",
               reference: nn.Module | None = None, data: Any = None,
               weights: Sequence[float] | None = None, max_rounds: int = 100,
               max_iter: int = 100, seed: int | None = 0,
               example_input: torch.Tensor | None = None,
               matching: str = "matrices", tol: float = 0.0,
               depth_weight: float = 1.0, restarts: int | None = None) -> ManyAlignment:
    """Align every model to ``reference`` (default: the first model), then refine.

    1. Each model is aligned to the reference by weight matching
       (:func:`ridgeline.connectivity.alignment.weight_matching` on the tensors chosen by
       ``matching``, see :func:`matched_tensors`) or activation matching
       (:func:`ridgeline.connectivity.align`).
    2. With ``method="weights"``, no separate reference and three or more models,
       MergeMany (Ainsworth et al. 2023, Algorithm 3): in a random order, each model's
       permutations are re-solved by weight matching against the weighted mean of the
       other (aligned) models, starting from its current permutations; rounds repeat until
       none changes (or ``max_rounds``), or, with ``tol > 0``, until a round lowers the
       spread Σ_i w_i ‖θ_i − θ̄‖² (matched tensors) by less than ``tol`` times itself. A
       model none of whose others changed since its last solve is not re-solved (it would
       get the same permutations back). With two models the mean of the others is the
       other model, so step 1 already is MergeMany's answer.

    ``depth_weight`` r ≥ 1 multiplies tensor k's term by r^(−l_k), l_k its layer's index
    (:func:`depth_weights`): r = 1 is Git Re-Basin's sum; on a chain, r > 1 weighs each
    unit's incoming weights r times more than its outgoing ones, and r → ∞ approaches
    matching layer by layer on incoming weights alone (Singh & Jaggi 2020). rebasin 0.0.47
    effectively uses r = 2 (its cost lists each layer's incoming tensors twice, twice over).

    ``restarts`` is passed to step 1's weight matching (see
    :func:`ridgeline.connectivity.alignment.weight_matching`; ``None``: 1, or more for specs
    with attention heads); MergeMany's refinements start from the current permutations and
    descend once.

    Every aligned model computes exactly its original's function.
    """
    if matching not in MATCHING:
        raise ConfigError(f"matching must be 'matrices' or 'all', got {matching!r}.")
    if tol < 0:
        raise ConfigError(f"tol must be ≥ 0, got {tol}.")
    if not (depth_weight >= 1 and np.isfinite(depth_weight)):
        raise ConfigError(f"depth_weight must be a finite number ≥ 1, got {depth_weight}.")
    check_restarts(restarts)
    reference_given = reference is not None
    reference = models[0] if reference is None else reference
    if example_input is None and data is not None:  # convolutional models need one to trace
        from ridgeline.objective import Objective

        first = next(Objective(reference, data, validate=False).per_batch(shard=False))
        example_input = first.inputs[:2]
    spec = permutation_spec(reference, example_input=example_input)
    weights = [1.0] * len(models) if weights is None else list(weights)
    identity = {p: torch.arange(n) for p, n in spec.perms.items()}
    perms: list[dict[str, torch.Tensor]] = []
    notes: list[str] = list(spec.notes)
    reference_params = _params(reference)
    names = matched_tensors(reference_params, spec, matching)

    # Σ_k α_k ⟨A_k, π(B_k)⟩ is Σ_k ⟨√α_k A_k, π(√α_k B_k)⟩: scale both sides
    scales = {k: math.sqrt(a) for k, a in depth_weights(reference_params, names,
                                                          depth_weight).items()}

    def matched(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: params[k] if scales[k] == 1 else params[k] * scales[k] for k in names}

    originals = [_params(m) for m in models]
    for model, params in zip(models, originals):
        if model is reference and not reference_given:
            perms.append(dict(identity))
        elif method == "weights":
            if getattr(spec, "head_groups", None) and spec.source == "traced":
                from ridgeline.connectivity.alignment import _check_same_heads

                _check_same_heads(spec, model, example_input)  # as connectivity.align does
            found, _, _ = weight_matching(matched(reference_params), matched(params), spec,
                                          max_iter=max_iter, seed=seed, restarts=restarts)
            perms.append(found)
        else:
            result = align_pair(reference, model, method=method, data=data, spec=spec,
                                max_iter=max_iter, seed=seed)
            perms.append({p: result.permutations[p] for p in spec.perms})
    rounds, converged = 0, True
    if method == "weights" and not reference_given and len(models) >= 3:
        from ridgeline.connectivity import apply_permutations

        rng = np.random.default_rng(seed)
        current = [apply_permutations(matched(p), spec, q) for p, q in zip(originals, perms)]
        spread = _spread(current, weights)
        converged = False
        # version[j] counts model j's changes; a model whose others have not changed since
        # its last converged solve would get its own permutations back (weight matching
        # started at a fixed point moves nothing), so that solve is skipped: same result.
        version = [0] * len(models)
        solved_against: list[tuple[int, ...] | None] = [None] * len(models)
        for _ in range(max(int(max_rounds), 1)):
            rounds += 1
            changed = False
            for i in rng.permutation(len(models)):
                others = [j for j in range(len(models)) if j != i]
                step_seed = int(rng.integers(2 ** 31))  # drawn even when skipped
                if sum(weights[j] for j in others) <= 0:
                    continue
                state = tuple(version[j] for j in others)
                if solved_against[i] == state:
                    continue
                mean = weighted_average([current[j] for j in others], [weights[j] for j in others])
                new, _, done = weight_matching(mean, matched(originals[i]), spec,
                                               max_iter=max_iter, seed=step_seed, init=perms[i])
                if any(not torch.equal(new[p], perms[i][p]) for p in spec.perms):
                    changed = True
                    version[i] += 1
                    perms[i] = new
                    current[i] = apply_permutations(matched(originals[i]), spec, new)
                solved_against[i] = state if done else None
            previous, spread = spread, _spread(current, weights)
            if not changed or (tol > 0 and previous - spread < tol * previous):
                converged = True
                break
        if not converged:
            notes.append(f"MergeMany stopped after max_rounds={max_rounds} rounds with "
                         "permutations still changing.")
    aligned = tuple(permute_model(m, spec, q) for m, q in zip(models, perms))
    used = None
    if method == "weights":
        from ridgeline.connectivity.heads import default_restarts

        used = restarts if restarts is not None else default_restarts(spec)
    return ManyAlignment(aligned, tuple(perms), rounds, converged, tuple(notes), used)


def check_restarts(restarts: Any) -> None:
    """``restarts`` is None (the default) or an integer ≥ 1."""
    if restarts is not None and (isinstance(restarts, bool) or not isinstance(restarts, int)
                                 or restarts < 1):
        raise ConfigError(f"restarts must be an integer ≥ 1 (runs of weight matching), or None "
                          f"for the default; got {restarts!r}.")


def _spread(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> float:
    """Σ_i w_i ‖θ_i − θ̄‖² over the matched tensors, θ̄ the weighted mean (what MergeMany
    lowers: each step re-solves one model against the mean of the others)."""
    mean = weighted_average(states, weights)
    return float(sum(w * sum(float((s[k] - mean[k]).double().pow(2).sum()) for k in mean)
                     for s, w in zip(states, weights)))


def moved_units(perms: Mapping[str, torch.Tensor]) -> int:
    return int(sum((p != torch.arange(p.numel())).sum() for p in perms.values()))
