"""The intrinsic dimension of an objective landscape (Li et al. 2018): the smallest random
subspace dimension d in which training reaches a set fraction of the full model's accuracy."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError, DataError
from ridgeline.progress import progress_bar
from ridgeline.subspace.model import SubspaceModel
from ridgeline.subspace.projections import PROJECTIONS

__all__ = ["intrinsic_dimension", "IntrinsicDimension", "DEFAULT_DIMS"]

#: the default coarse grid of subspace dimensions
DEFAULT_DIMS = (10, 30, 100, 300, 1000, 3000)

#: full-model learning rate used when ``baseline_lr`` is not given
_FULL_MODEL_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.05}


@dataclass(frozen=True)
class IntrinsicDimension:
    """Accuracy of subspace training per dimension d, and the intrinsic dimension.

    Attributes
    ----------
    dims : tuple of int
        Every d evaluated, increasing.
    accuracies : tuple of tuple of float
        ``accuracies[i][s]``: accuracy after training in a d = ``dims[i]`` subspace with
        seed number s.
    baseline : float
        The reference accuracy: the measured full-model accuracy (mean over seeds) or the
        given number.
    baseline_kind : {"measured", "given"}
    threshold : float
        The fraction of the baseline to reach (0.9 for d_int90).
    d_int90 : int or None
        The smallest evaluated d whose mean accuracy ≥ ``target``; ``None`` if none did.
    target : float
        ``threshold · baseline``.
    baseline_accuracies : tuple of float
        Full-model accuracy per seed (empty when the baseline was given).
    losses : tuple of tuple of float
        Final training loss per d and seed.
    num_params : int
        D, the parameter count of the full model.
    projection, search, metric : str
        The projection kind, ``"grid"`` or ``"bisect"``, and which accuracy is compared
        (``"test accuracy"`` on ``eval_data`` or ``"train accuracy"``).
    epochs, seeds : int
    seconds : float
        Wall time of the whole measurement.
    config : dict
        Training settings (optimizer, learning rates, batch size, seed, tol).
    """

    dims: tuple[int, ...]
    accuracies: tuple[tuple[float, ...], ...]
    baseline: float
    baseline_kind: str
    threshold: float
    d_int90: int | None
    target: float
    baseline_accuracies: tuple[float, ...] = ()
    losses: tuple[tuple[float, ...], ...] = ()
    num_params: int = 0
    projection: str = "dense"
    search: str = "grid"
    metric: str = "test accuracy"
    epochs: int = 0
    seeds: int = 1
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def mean_accuracies(self) -> tuple[float, ...]:
        """Accuracy per d, averaged over seeds."""
        return tuple(sum(a) / len(a) for a in self.accuracies)

    @property
    def basis(self) -> str:
        """The threshold basis in words: what d_int90 is relative to."""
        percent = f"{100 * self.threshold:g} %"
        if self.baseline_kind == "measured":
            ref = (f"{percent} of the measured full-model {self.metric} {self.baseline:.4f} "
                   f"(same optimizer budget: {self.epochs} epochs)")
        elif self.baseline == 1.0:
            ref = f"{percent} absolute {self.metric}"
        else:
            ref = f"{percent} of the given baseline {self.metric} {self.baseline:.4f}"
        return f"{ref}: target {self.metric} {self.target:.4f}"

    def to_dict(self) -> dict:
        """JSON-safe summary (no tensors)."""
        return {"dims": list(self.dims), "accuracies": [list(a) for a in self.accuracies],
                "mean_accuracies": list(self.mean_accuracies), "baseline": self.baseline,
                "baseline_kind": self.baseline_kind, "baseline_accuracies": list(self.baseline_accuracies),
                "threshold": self.threshold, "target": self.target, "d_int90": self.d_int90,
                "basis": self.basis, "losses": [list(v) for v in self.losses],
                "num_params": self.num_params, "projection": self.projection, "search": self.search,
                "metric": self.metric, "epochs": self.epochs, "seeds": self.seeds,
                "seconds": self.seconds, "config": dict(self.config)}

    def plot(self, ax=None):
        """Accuracy vs d (log axis; every seed as a dot, the mean as a line) with the
        baseline, the threshold line and d_int90 marked. Returns the Axes."""
        return plot_intrinsic(self.to_dict(), ax=ax)


def plot_intrinsic(result: dict, ax=None):
    """Draw an :class:`IntrinsicDimension` from its ``to_dict()`` (used by the report)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.figure(figsize=(5.5, 3.6)).gca()
    dims, accs = result["dims"], result["accuracies"]
    for d, per_seed in zip(dims, accs):
        ax.scatter([d] * len(per_seed), per_seed, s=10, color="C0", alpha=0.5)
    ax.plot(dims, result["mean_accuracies"], marker="o", ms=4, color="C0",
            label=f"subspace ({result['projection']})")
    ax.axhline(result["baseline"], color="0.4", ls=":", label=f"baseline {result['baseline']:.3f}")
    ax.axhline(result["target"], color="C3", ls="--",
               label=f"{100 * result['threshold']:g} % line {result['target']:.3f}")
    if result["d_int90"] is not None:
        ax.axvline(result["d_int90"], color="C2", ls="-.", label=f"d_int = {result['d_int90']}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(result["metric"])
    ax.legend(fontsize=7, loc="lower right")
    return ax


def intrinsic_dimension(model_fn: Callable[[], nn.Module] | nn.Module, data: Any, *,
                        dims: Sequence[int] = DEFAULT_DIMS, threshold: float = 0.9,
                        baseline: str | float = "measured", epochs: int = 10, seeds: int = 1,
                        search: str = "grid", eval_data: Any = None, projection: str = "dense",
                        optimizer: str = "adam", lr: float = 3e-2, baseline_lr: float | None = None,
                        momentum: float = 0.9, batch_size: int = 128,
                        loss: str = "cross_entropy", tol: float = 0.1, seed: int = 0,
                        memory_budget: int | None = None, progress: bool = True
                        ) -> IntrinsicDimension:
    """The intrinsic dimension d_int of an objective landscape (Li et al. 2018).

    For each d, a fresh model is trained only within the random affine subspace
    θ = θ₀ + P z, z ∈ R^d (:class:`SubspaceModel`), for ``epochs`` epochs; its accuracy
    a(d) is measured on ``eval_data`` (or the training data). Then

        d_int = min { d : mean over seeds of a(d) ≥ threshold · baseline },

    with ``baseline`` the full model's accuracy after training the same way in all its D
    parameters (``"measured"``) or a given accuracy (a float; ``baseline=1.0,
    threshold=0.9`` is the "90 % absolute accuracy" basis of the original code, which
    puts MNIST's FC network at 750 against ~525 on the measured-baseline basis).

    Parameters
    ----------
    model_fn : callable () -> nn.Module, or nn.Module
        Builds a fresh, untrained model (called under ``torch.manual_seed(seed + s)`` for
        seed number s), or a model to deep-copy (then θ₀ is the same for every seed).
    data : Dataset or (inputs, targets)
        Training data with integer class labels.
    dims : sequence of int
        The grid of subspace dimensions, each in [1, D].
    threshold : float in (0, 1]
    baseline : "measured" or float in (0, 1]
    epochs, batch_size, optimizer, lr, momentum : training of z (see :func:`ridgeline.train`)
    seeds : int
        Repeats per d (different θ₀, P and data order); accuracies are averaged.
    search : {"grid", "bisect"}
        ``"grid"`` evaluates ``dims`` only. ``"bisect"`` evaluates the grid, then bisects
        (geometrically, on integers) between the largest failing d below the first passing
        d and that d until hi / lo ≤ 1 + ``tol`` or hi − lo ≤ 1 (assumes a(d) increases).
    eval_data : Dataset or (inputs, targets), optional
        Where accuracy is measured (the paper uses held-out data); default the training data.
    projection : {"dense", "sparse", "fastfood", "orthogonal"}
    baseline_lr : float, optional
        Learning rate of the full-model baseline; default 1e-3 for Adam/AdamW and 0.05 for
        SGD (subspace training usually wants a larger step than the full model).
    loss : {"cross_entropy", "mse"}
    seed : int
        Base seed: run s uses ``seed + s`` for θ₀, P and the data order.
    memory_budget : int, optional
        Bytes one projection may take (see :class:`SubspaceModel`).
    progress : bool

    Returns
    -------
    IntrinsicDimension
        dims, accuracies (per d, per seed), baseline, baseline_kind, threshold, target,
        d_int90, and ``basis`` stating what the threshold is relative to.

    References
    ----------
    Li, Farkhoor, Liu & Yosinski (2018), "Measuring the intrinsic dimension of objective
    landscapes", ICLR.
    """
    from ridgeline.objective import Objective
    from ridgeline.train import coerce_tensors, train

    began = time.perf_counter()
    grid = _check_options(dims, threshold, baseline, epochs, seeds, search, projection, tol)
    inputs, targets, _ = coerce_tensors(data)
    if targets.is_floating_point():
        raise DataError("the intrinsic dimension is defined by classification accuracy; the data "
                        "has float (regression) targets. Pass integer class labels.")
    if eval_data is not None:
        coerce_tensors(eval_data, "eval_data")
    probe = _build(model_fn, seed)
    num_params = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    if num_params == 0:
        raise ConfigError(f"{type(probe).__name__} has no trainable parameters.")
    if grid[-1] > num_params:
        raise ConfigError(f"dims go up to {grid[-1]} but the model has only D = {num_params} "
                          f"trainable parameters; every d must satisfy 1 ≤ d ≤ {num_params}.")
    base_lr = baseline_lr if baseline_lr is not None else _FULL_MODEL_LR.get(optimizer, lr)
    measure_on = eval_data if eval_data is not None else data
    train_kw = dict(optimizer=optimizer, momentum=momentum, epochs=epochs, batch_size=batch_size,
                    loss=loss, progress=False)

    def accuracy(model: nn.Module) -> float:
        return float(Objective(model, measure_on, loss, validate=False).loss_and_accuracy()[1])

    def run(model: nn.Module, run_seed: int, rate: float) -> tuple[float, float]:
        result = train(model, data, lr=rate, seed=run_seed, **train_kw)
        return accuracy(model), float(result.final["train_loss"])

    runs: dict[int, list[tuple[float, float]]] = {}
    total = (seeds if baseline == "measured" else 0) + len(grid) * seeds
    with progress_bar(total if search == "grid" else None, "intrinsic dimension", progress) as bar:
        baseline_accs: tuple[float, ...] = ()
        if baseline == "measured":
            baseline_accs = tuple(run(_build(model_fn, seed + s), seed + s, base_lr)[0]
                                  for s in range(seeds))
            bar.advance(seeds, info=f"baseline {sum(baseline_accs) / seeds:.3f}")
            reference = sum(baseline_accs) / seeds
        else:
            reference = float(baseline)
        target = threshold * reference

        def evaluate(d: int) -> float:
            if d not in runs:
                runs[d] = [run(SubspaceModel(_build(model_fn, seed + s), d, projection=projection,
                                             seed=seed + s, memory_budget=memory_budget),
                               seed + s, lr) for s in range(seeds)]
                bar.advance(seeds, info=f"d={d}")
            return sum(a for a, _ in runs[d]) / seeds

        for d in grid:
            evaluate(d)
        if search == "bisect":
            _bisect(evaluate, runs, target, tol)

    ordered = sorted(runs)
    means = {d: sum(a for a, _ in runs[d]) / seeds for d in ordered}
    passing = [d for d in ordered if means[d] >= target]
    return IntrinsicDimension(
        dims=tuple(ordered), accuracies=tuple(tuple(a for a, _ in runs[d]) for d in ordered),
        baseline=reference, baseline_kind="measured" if baseline == "measured" else "given",
        threshold=float(threshold), d_int90=passing[0] if passing else None, target=target,
        baseline_accuracies=baseline_accs, losses=tuple(tuple(v for _, v in runs[d]) for d in ordered),
        num_params=num_params, projection=projection, search=search,
        metric="test accuracy" if eval_data is not None else "train accuracy", epochs=epochs,
        seeds=seeds, seconds=time.perf_counter() - began,
        config={"optimizer": optimizer, "lr": lr, "baseline_lr": base_lr if baseline == "measured" else None,
                "momentum": momentum, "batch_size": batch_size, "loss": loss, "seed": seed, "tol": tol})


def _bisect(evaluate: Callable[[int], float], runs: dict, target: float, tol: float) -> None:
    """Narrow the bracket (largest failing d, smallest passing d) geometrically."""
    means = {d: evaluate(d) for d in sorted(runs)}
    passing = [d for d in sorted(means) if means[d] >= target]
    if not passing:
        return
    hi = passing[0]
    lo = max((d for d in means if d < hi), default=0)
    while hi - lo > 1 and (lo == 0 or hi / lo > 1 + tol):
        mid = int(round(math.sqrt(max(lo, 1) * hi)))
        mid = min(max(mid, lo + 1), hi - 1)
        if evaluate(mid) >= target:
            hi = mid
        else:
            lo = mid


def _build(model_fn: Callable[[], nn.Module] | nn.Module, seed: int) -> nn.Module:
    if isinstance(model_fn, nn.Module):
        return copy.deepcopy(model_fn)
    if not callable(model_fn):
        raise ConfigError(f"model_fn must be a zero-argument callable returning a model, or a "
                          f"model to copy; got {type(model_fn).__name__}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model_fn() must return a torch.nn.Module, got {type(model).__name__}.")
    return model


def _check_options(dims, threshold, baseline, epochs, seeds, search, projection, tol) -> list[int]:
    grid = sorted({int(d) for d in dims}) if dims is not None else []
    if not grid or any(int(d) != d for d in dims) or grid[0] < 1:
        raise ConfigError(f"dims must be a non-empty list of positive integers, got {dims!r}.")
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must lie in (0, 1] (0.9 for d_int90), got {threshold}.")
    if isinstance(baseline, str):
        if baseline != "measured":
            raise ConfigError(f"baseline must be 'measured' or an accuracy in (0, 1], got {baseline!r}.")
    elif not 0 < float(baseline) <= 1:
        raise ConfigError(f"a given baseline is an accuracy in (0, 1], got {baseline}.")
    if epochs < 1 or seeds < 1:
        raise ConfigError(f"epochs and seeds must be ≥ 1, got epochs={epochs}, seeds={seeds}.")
    if search not in ("grid", "bisect"):
        raise ConfigError(f"search must be 'grid' or 'bisect', got {search!r}.")
    if projection not in PROJECTIONS:
        raise ConfigError(f"unknown projection {projection!r}; choose one of {list(PROJECTIONS)}.")
    if not tol > 0:
        raise ConfigError(f"tol must be positive, got {tol}.")
    return grid
