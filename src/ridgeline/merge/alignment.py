"""Bringing N networks into one permutation frame before they are merged: every model
aligned to a reference, then Git Re-Basin's MergeMany (each model re-aligned to the mean
of the others until no permutation changes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ridgeline.connectivity import align as align_pair
from ridgeline.connectivity import permutation_spec, permute_model
from ridgeline.connectivity.alignment import weight_matching

from .combine import weighted_average

__all__ = ["align_many", "ManyAlignment"]


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


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def align_many(models: Sequence[nn.Module], *, method: str = "weights",
               reference: nn.Module | None = None, data: Any = None,
               weights: Sequence[float] | None = None, max_rounds: int = 100,
               max_iter: int = 100, seed: int | None = 0,
               example_input: torch.Tensor | None = None) -> ManyAlignment:
    """Align every model to ``reference`` (default: the first model), then refine.

    1. Each model is aligned to the reference by weight or activation matching
       (:func:`ridgeline.connectivity.align`).
    2. With ``method="weights"``, no separate reference and three or more models,
       MergeMany (Ainsworth et al. 2023, Algorithm 3): in a random order, each model's
       permutations are re-solved by weight matching against the weighted mean of the
       other (aligned) models, starting from its current permutations; rounds repeat until
       none changes (or ``max_rounds``). With two models the mean of the others is the
       other model, so step 1 already is MergeMany's answer.

    Every aligned model computes exactly its original's function.
    """
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
    for model in models:
        if model is reference and not reference_given:
            perms.append(dict(identity))
            continue
        result = align_pair(reference, model, method=method, data=data, spec=spec,
                            max_iter=max_iter, seed=seed)
        perms.append({p: result.permutations[p] for p in spec.perms})
    rounds, converged = 0, True
    originals = [_params(m) for m in models]
    if method == "weights" and not reference_given and len(models) >= 3:
        from ridgeline.connectivity import apply_permutations

        rng = np.random.default_rng(seed)
        current = [apply_permutations(p, spec, q) for p, q in zip(originals, perms)]
        converged = False
        for _ in range(max(int(max_rounds), 1)):
            rounds += 1
            changed = False
            for i in rng.permutation(len(models)):
                others = [j for j in range(len(models)) if j != i]
                if sum(weights[j] for j in others) <= 0:
                    continue
                mean = weighted_average([current[j] for j in others], [weights[j] for j in others])
                new, _, _ = weight_matching(mean, originals[i], spec, max_iter=max_iter,
                                            seed=int(rng.integers(2 ** 31)), init=perms[i])
                if any(not torch.equal(new[p], perms[i][p]) for p in spec.perms):
                    changed = True
                    perms[i] = new
                    current[i] = apply_permutations(originals[i], spec, new)
            if not changed:
                converged = True
                break
        if not converged:
            notes.append(f"MergeMany stopped after max_rounds={max_rounds} rounds with "
                         "permutations still changing.")
    aligned = tuple(permute_model(m, spec, q) for m, q in zip(models, perms))
    return ManyAlignment(aligned, tuple(perms), rounds, converged, tuple(notes))


def moved_units(perms: Mapping[str, torch.Tensor]) -> int:
    return int(sum((p != torch.arange(p.numel())).sum() for p in perms.values()))
