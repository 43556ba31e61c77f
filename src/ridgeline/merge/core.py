"""``merge``: one network from several of the same architecture."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError, DataError
from ridgeline.params import Params, check_same_structure, make_generator, named_buffers

from .alignment import MATCHING, check_restarts
from .combine import dare, fisher_average, task_arithmetic, task_vectors, ties, weighted_average
from .fisher import FISHER_KINDS, fisher_diagonal

__all__ = ["merge", "MergeResult", "METHODS", "TASK_METHODS"]

METHODS = ("average", "fisher", "task_arithmetic", "ties", "dare")
TASK_METHODS = ("task_arithmetic", "ties", "dare")
ALIGNMENTS = (None, "weights", "activations")


@dataclass(frozen=True)
class MergeResult:
    """The outcome of :func:`merge`.

    Attributes
    ----------
    model : nn.Module
        The merged network (a new module; the inputs are unchanged).
    method : str
    align : str or None
    permutations : tuple[dict[str, Tensor], ...] or None
        With ``align``: for each input model, permutation name → ``perm`` with unit i of
        the aligned model equal to unit ``perm[i]`` of the original.
    weights : tuple[float, ...]
        The weights as used (normalised to sum 1 for average and fisher).
    distances : tuple[float, ...]
        ‖θ_merged − θ_i‖ / ‖θ_i‖ for every (aligned) input model.
    endpoints : tuple[nn.Module, ...]
        The input models as merged: aligned copies with ``align``, else the inputs.
    notes : tuple[str, ...]
    seconds : float
    details : dict
        Method specifics: MergeMany rounds, Fisher fallback entries, units moved, ….
    """

    model: nn.Module
    method: str
    align: str | None
    permutations: tuple[dict[str, torch.Tensor], ...] | None
    weights: tuple[float, ...]
    distances: tuple[float, ...]
    endpoints: tuple[nn.Module, ...] = field(repr=False, default=())
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        perms = None if self.permutations is None else [
            {k: v.tolist() for k, v in p.items()} for p in self.permutations]
        return to_jsonable({"method": self.method, "align": self.align,
                            "weights": list(self.weights), "distances": list(self.distances),
                            "permutations": perms, "notes": list(self.notes),
                            "seconds": self.seconds, "details": dict(self.details)})

    def plot(self, ax=None):
        """Relative distance of the merged network from each input model."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(4.5, 3)
        ax.bar(range(len(self.distances)), self.distances)
        ax.set_xticks(range(len(self.distances)), [f"model {i}" for i in range(len(self.distances))])
        ax.set_ylabel("‖θ_merged − θ_i‖ / ‖θ_i‖")
        ax.set_title(f"{self.method}" + (f", aligned ({self.align})" if self.align else ""))
        return ax


def _state(model: nn.Module) -> Params:
    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update(named_buffers(model))
    return state


def _check_models(models: Any, base: Any) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise ConfigError("models must be a list of torch.nn.Module (two or more to merge).")
    models = list(models)
    if not models:
        raise ConfigError("models is empty: pass the networks to merge.")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] must be a torch.nn.Module, got {type(m).__name__}.")
    first = _state(models[0])
    for i, m in enumerate(models[1:], start=1):
        check_same_structure(first, _state(m), names=("models[0]", f"models[{i}]"))
    if base is not None:
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be a torch.nn.Module, got {type(base).__name__}.")
        check_same_structure(first, _state(base), names=("models[0]", "base"))
    return models


def _check_weights(weights: Sequence[float] | None, count: int, method: str) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"weights has {len(weights)} entries but there are {count} models; "
                          "pass one weight per model.")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise ConfigError(f"weights must be finite and non-negative; got {weights}.")
    if sum(weights) <= 0:
        raise ConfigError(f"weights are all zero ({weights}); at least one model needs a "
                          "positive weight.")
    return weights


def _validate(method: str, align: str | None, base: Any, data: Any, density: float,
              scale: float, fisher: str, repair: bool, reset_bn: Any) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}.")
    if align not in ALIGNMENTS:
        raise ConfigError(f"align must be None, 'weights' or 'activations', got {align!r}.")
    if method in TASK_METHODS and base is None:
        raise ConfigError(f"method {method!r} merges task vectors τ_i = θ_i − θ_base and needs "
                          "the base model they were fine-tuned from: pass base=model.")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ConfigError(f"density must lie in (0, 1] (the fraction of each task vector "
                          f"kept), got {density}.")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ConfigError(f"scale must be a finite number, got {scale}.")
    if fisher not in FISHER_KINDS:
        raise ConfigError(f"fisher must be 'exact' or 'empirical', got {fisher!r}.")
    if method == "fisher" and data is None:
        raise DataError("Fisher merging weighs every parameter by its Fisher information on "
                        "data: pass data=(inputs, targets), a Dataset or a DataLoader.")
    if align == "activations" and data is None:
        raise DataError("activation matching needs data: pass data=..., or align='weights'.")
    if repair and data is None and reset_bn is None:
        raise DataError("REPAIR measures unit statistics on data: pass reset_bn=data (or "
                        "data=...).")


def _per_model_data(data: Any, count: int) -> list | None:
    """A list of ``count`` data sets, one per model, or None for one shared data set."""
    if not isinstance(data, (list, tuple)) or any(isinstance(d, torch.Tensor) for d in data):
        return None
    if len(data) != count:
        raise DataError(f"data is a list of {len(data)} data sets but there are {count} models; "
                        "pass one data set per model, or a single one for all.")
    return list(data)


def _norm(state: Params, names: Sequence[str]) -> float:
    return math.sqrt(sum(float(state[k].double().pow(2).sum()) for k in names))


def merge(models: Sequence[nn.Module], *, method: str = "average", align: str | None = None,
          base: nn.Module | None = None, weights: Sequence[float] | None = None,
          data: Any = None, scale: float = 1.0, density: float = 0.2, fisher: str = "exact",
          reset_bn: Any = None, repair: bool = False, seed: int | None = 0,
          max_rounds: int = 100, matching: str = "matrices", tol: float = 0.0,
          depth_weight: float = 1.0, chunk_size: int | None = None,
          batch_size: int | None = None, restarts: int | None = None) -> MergeResult:
    """Merge networks of one architecture into one.

    ``average``
        θ = Σ_i w_i θ_i / Σ_i w_i (uniform weights by default; Wortsman et al. 2022).
    ``fisher``
        θ = Σ_i w_i F_i ⊙ θ_i / Σ_i w_i F_i elementwise, F_i the diagonal Fisher of model i
        on ``data`` (:func:`fisher_diagonal`, ``fisher="exact"`` or ``"empirical"``);
        where Σ w_i F_i vanishes, the plain weighted average (Matena & Raffel 2022).
    ``task_arithmetic``
        θ = θ_base + scale · Σ_i w_i τ_i, τ_i = θ_i − θ_base (Ilharco et al. 2023).
    ``ties``
        Per tensor: trim each τ_i to its ⌈density·n⌉ largest-magnitude entries, elect the
        sign of Σ w_i τ̂_i, average the trimmed entries that agree with it;
        θ = θ_base + scale · τ (Yadav et al. 2023).
    ``dare``
        Drop each entry of τ_i with probability 1 − density and rescale by 1/density, then
        task arithmetic (Yu et al. 2024); seeded by ``seed``.

    With ``align="weights"`` or ``"activations"`` the models are first permuted into one
    frame (Git Re-Basin): each is aligned to the first, and with weight matching and three
    or more models MergeMany re-aligns each to the mean of the others until no permutation
    changes. For the task-vector methods every model is aligned to ``base`` instead (the
    vectors must live in the base's frame). Buffers (BatchNorm statistics) are averaged
    with the normalised weights; pass ``reset_bn=training data`` to re-estimate them on
    the merged network (Jordan et al. 2023).

    Parameters
    ----------
    models : sequence of nn.Module
        One architecture (else ArchitectureMismatchError naming the tensors).
    weights : sequence of float, optional
        One non-negative weight per model, not all zero. Normalised for average and fisher;
        for the task-vector methods they multiply each τ_i (default 1 each).
    data : (inputs, targets), Dataset or DataLoader, or a list of them (one per model)
        For the Fisher (with a list, each model's Fisher on its own data, as Matena &
        Raffel do for models fine-tuned on different tasks) and for activation matching
        (the first data set of a list).
    scale : float
        λ of the task-vector methods.
    density : float in (0, 1]
        Kept fraction for TIES and keep probability for DARE.
    reset_bn : data, optional
        Re-estimate the merge's BatchNorm statistics on this data.
    repair : bool
        For networks without BatchNorm: REPAIR (Jordan et al. 2023) the merge, rescaling
        each hidden unit (baked into its weights and bias) so that its pre-activation
        mean and standard deviation over ``reset_bn`` data (or ``data``) equal the
        weighted mean of the models' (see :func:`ridgeline.merge.repair.repair_merged`).
    seed : int
        Weight-matching order, MergeMany order and DARE's masks.
    matching : {"matrices", "all"}
        The tensors weight matching compares (``align="weights"``): ``"matrices"`` (default)
        the weight matrices and convolution kernels only, ``"all"`` biases and
        normalisation parameters too, as in Git Re-Basin's objective. On three MNIST-1D
        MLPs, matching on matrices gave merges ~1.5–2 points more accurate (docs/merging.md).
        Either way every tensor is permuted and averaged.
    depth_weight : float ≥ 1
        Weight matching multiplies layer l's term by ``depth_weight``^(−l) (layers counted
        by their weight matrices in parameter order; meant for chains such as MLPs): 1 is
        Git Re-Basin's objective; 2 is the cost rebasin 0.0.47 effectively minimises
        (lower merged loss in docs/merging.md's benchmark).
    tol : float
        MergeMany stops when a round changes no permutation (``tol=0``, the paper's rule)
        or lowers the models' spread Σ_i w_i ‖θ_i − θ̄‖² by less than ``tol`` times itself.
    restarts : int ≥ 1, optional
        Runs of weight matching (``align="weights"``) when each model is aligned to the
        reference, by iterated local search keeping the highest objective
        (:func:`ridgeline.connectivity.alignment.weight_matching`); ``None``: 1 for models
        without attention heads, more for transformers. Ignored by the other alignments.

    Returns
    -------
    MergeResult

    References
    ----------
    Ainsworth, Hayase & Srinivasa (2023), "Git Re-Basin", ICLR (MergeMany); Matena & Raffel
    (2022), "Merging models with Fisher-weighted averaging", NeurIPS; Ilharco et al. (2023),
    "Editing models with task arithmetic", ICLR; Yadav et al. (2023), "TIES-Merging",
    NeurIPS; Yu et al. (2024), "Language models are Super Mario", ICML.
    """
    began = time.perf_counter()
    models = _check_models(models, base)
    _validate(method, align, base, data, density, scale, fisher, repair, reset_bn)
    if matching not in MATCHING:
        raise ConfigError(f"matching must be 'matrices' or 'all' (the tensors weight matching "
                          f"compares), got {matching!r}.")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ConfigError(f"tol must be a number ≥ 0 (0: MergeMany runs until no permutation "
                          f"changes), got {tol!r}.")
    if not (isinstance(depth_weight, (int, float)) and math.isfinite(depth_weight)
            and depth_weight >= 1):
        raise ConfigError(f"depth_weight must be a finite number ≥ 1 (1: every layer counts "
                          f"alike in weight matching), got {depth_weight!r}.")
    check_restarts(restarts)
    raw_weights = _check_weights(weights, len(models), method)
    per_model = _per_model_data(data, len(models))
    if per_model is not None:
        data = per_model[0]
    notes: list[str] = []
    details: dict[str, Any] = {}
    endpoints = list(models)
    permutations = None
    if align is not None and len(models) + (base is not None and method in TASK_METHODS) >= 2:
        from .alignment import align_many, moved_units

        reference = base if method in TASK_METHODS else None
        aligned = align_many(models, method=align, reference=reference, data=data,
                             weights=raw_weights, max_rounds=max_rounds, seed=seed,
                             matching=matching, tol=tol, depth_weight=depth_weight,
                             restarts=restarts)
        endpoints, permutations = list(aligned.models), aligned.permutations
        notes += list(aligned.notes)
        details.update(merge_many_rounds=aligned.rounds, merge_many_converged=aligned.converged,
                       units_moved=[moved_units(p) for p in aligned.permutations])
        if aligned.restarts is not None:
            details["restarts"] = aligned.restarts
    states = [_state(m) for m in endpoints]
    param_names = [k for k, _ in models[0].named_parameters()]
    total = sum(raw_weights)
    normalised = [w / total for w in raw_weights]
    merged_buffers = weighted_average([named_buffers(m) for m in endpoints], raw_weights)
    if method == "average":
        merged = weighted_average(states, raw_weights)
        used = normalised
    elif method == "fisher":
        sources = per_model if per_model is not None else [data] * len(endpoints)
        fishers = [fisher_diagonal(m, d, kind=fisher, chunk_size=chunk_size,
                                   batch_size=batch_size) for m, d in zip(endpoints, sources)]
        merged, fallback = fisher_average(states, fishers, raw_weights)
        details.update(fisher=fisher, fisher_fallback_entries=fallback)
        if fallback:
            notes.append(f"{fallback} entries have zero Fisher in every model; they take the "
                         "plain weighted average.")
        used = normalised
    else:
        base_state = _state(base)
        vectors = task_vectors([{k: s[k] for k in param_names} for s in states],
                               {k: base_state[k] for k in param_names})
        base_params = {k: base_state[k] for k in param_names}
        if method == "task_arithmetic":
            merged = task_arithmetic(base_params, vectors, raw_weights, scale)
        elif method == "ties":
            merged = ties(base_params, vectors, raw_weights, density=density, scale=scale)
        else:
            merged = dare(base_params, vectors, raw_weights, density=density, scale=scale,
                          generator=make_generator(seed))
        used = raw_weights
        details.update(scale=scale, density=density if method != "task_arithmetic" else None)
    out = copy.deepcopy(endpoints[0])
    with torch.no_grad():
        for name, tensor in out.named_parameters():
            tensor.copy_(merged[name])
        for name, tensor in out.named_buffers():
            tensor.copy_(merged_buffers[name])
    from ridgeline.connectivity.paths import _batchnorms

    if repair and _batchnorms(out):
        notes.append("repair=True is for networks without BatchNorm; this one has BatchNorm: "
                     "pass reset_bn=data instead. Nothing repaired.")
    elif repair:
        from ridgeline.objective import Objective

        from .repair import repair_merged

        source = reset_bn if reset_bn is not None else data
        batches = [b.inputs for b in Objective(out, source, batch_size=batch_size,
                                               validate=False).per_batch(shard=False)]
        out, repair_notes = repair_merged(out, endpoints, raw_weights, batches)
        notes += repair_notes
        details["repair"] = True
    if reset_bn is not None:
        from ridgeline.connectivity import reset_bn as reset

        if _batchnorms(out):
            out = reset(out, reset_bn, batch_size=batch_size)
            details["bn_reset"] = True
        elif not repair:
            notes.append("reset_bn was given but the model has no BatchNorm; nothing reset "
                         "(repair=True uses it for REPAIR).")
    final = _state(out)
    distances = tuple(math.sqrt(sum(float((final[k] - s[k]).double().pow(2).sum())
                                    for k in param_names)) / max(_norm(s, param_names), 1e-30)
                      for s in states)
    return MergeResult(out, method, align, permutations, tuple(used), distances,
                       tuple(endpoints), tuple(notes), time.perf_counter() - began, details)
