"""The intrinsic dimension of an objective landscape (Li et al. 2018): the smallest random
subspace dimension d in which training reaches a set fraction of the full model's accuracy."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ridgeline.errors import (
    ConfigError,
    ConvergenceWarning,
    DataError,
    MemoryBudgetError,
    NonFiniteLossError,
)
from ridgeline.progress import progress_bar
from ridgeline.subspace.model import SubspaceModel
from ridgeline.subspace.projections import PROJECTIONS, projection_bytes

__all__ = ["intrinsic_dimension", "IntrinsicDimension", "DEFAULT_DIMS"]

#: the default coarse grid of subspace dimensions
DEFAULT_DIMS = (10, 30, 100, 300, 1000, 3000)

#: full-model learning rate used when ``baseline_lr`` is not given
_FULL_MODEL_LR = {"adam": 3e-3, "adamw": 3e-3, "sgd": 0.05}


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
        Final training loss per d and seed (``None`` where training diverged).
    learning_rates : tuple of tuple of float
        The learning rate kept (best accuracy) per d and seed.
    baseline_learning_rates : tuple of float
    num_params : int
        D, the parameter count of the full model.
    projection, search, metric : str
        The projection kind, ``"grid"`` or ``"bisect"``, and which accuracy is compared
        (``"test accuracy"`` on ``eval_data`` or ``"train accuracy"``).
    epochs, baseline_epochs, seeds : int
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
    losses: tuple[tuple[float | None, ...], ...] = ()
    learning_rates: tuple[tuple[float, ...], ...] = ()
    baseline_learning_rates: tuple[float, ...] = ()
    num_params: int = 0
    projection: str = "dense"
    search: str = "grid"
    metric: str = "test accuracy"
    epochs: int = 0
    baseline_epochs: int = 0
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
                   f"(full model {self.baseline_epochs} epochs, subspaces {self.epochs})")
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
                "learning_rates": [list(v) for v in self.learning_rates],
                "baseline_learning_rates": list(self.baseline_learning_rates),
                "num_params": self.num_params, "projection": self.projection, "search": self.search,
                "metric": self.metric, "epochs": self.epochs,
                "baseline_epochs": self.baseline_epochs, "seeds": self.seeds,
                "seconds": self.seconds, "config": dict(self.config)}

    def plot(self, ax=None):
        """Accuracy vs d (log axis; every seed as a dot, the mean as a line) with the
        baseline, the threshold line and d_int90 marked. Returns the Axes."""
        return plot_intrinsic(self.to_dict(), ax=ax)


def plot_intrinsic(result: dict, ax=None):
    """Draw an :class:`IntrinsicDimension` from its ``to_dict()`` (used by the report)."""
    from ridgeline.plotting import new_axes

    ax = new_axes(ax, 5.5, 3.6)
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


Rates = float | Sequence[float]


def intrinsic_dimension(model_fn: Callable[[], nn.Module] | nn.Module, data: Any, *,
                        dims: Sequence[int] = DEFAULT_DIMS, threshold: float = 0.9,
                        baseline: str | float = "measured", epochs: int = 10, seeds: int = 1,
                        search: str = "grid", eval_data: Any = None, projection: str = "dense",
                        optimizer: str = "adam", lr: Rates = 3e-2, baseline_lr: Rates | None = None,
                        baseline_epochs: int | None = None, momentum: float = 0.9,
                        batch_size: int = 128, loss: str = "cross_entropy", tol: float = 0.1,
                        seed: int = 0, memory_budget: int | None = None, progress: bool = True
                        ) -> IntrinsicDimension:
    """The intrinsic dimension d_int of an objective landscape (Li et al. 2018).

    For each d, a fresh model is trained only within the random affine subspace
    θ = θ₀ + P z, z ∈ R^d (:class:`SubspaceModel`), for ``epochs`` epochs; its accuracy
    a(d) is measured on ``eval_data`` (or the training data). Then

        d_int = min { d : mean over seeds of a(d) ≥ threshold · baseline },

    with ``baseline`` the full model's accuracy after training in all its D parameters
    (``"measured"``, the basis of Li et al.'s d_int90) or a given accuracy (a float;
    ``baseline=1.0, threshold=0.9`` is an absolute "90 % accuracy" basis).

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
    epochs, batch_size, optimizer, momentum : training of z (see :func:`ridgeline.train`)
    lr : float or sequence of float
        Learning rate of z. With several, every run is repeated with each and the best
        accuracy is kept (the question is whether the subspace *contains* a solution; the
        best step size depends on d: with Adam the step in θ grows like lr·√d).
    seeds : int
        Repeats per d (different θ₀, P and data order); accuracies are averaged.
    search : {"grid", "bisect"}
        ``"grid"`` evaluates ``dims`` only. ``"bisect"`` evaluates the grid, then bisects
        (geometrically, on integers) between the largest failing d below the first passing
        d and that d until hi / lo ≤ 1 + ``tol`` or hi − lo ≤ 1 (assumes a(d) increases).
    eval_data : Dataset or (inputs, targets), optional
        Where accuracy is measured (the paper uses held-out data); default the training
        data. Picking the best of several learning rates on it is a selection: pass a
        validation split to keep a test split untouched.
    projection : {"dense", "sparse", "fastfood", "orthogonal"}
    baseline_lr : float or sequence of float, optional
        Learning rate(s) of the full-model baseline; default 3e-3 for Adam/AdamW and 0.05
        for SGD (the full model wants a smaller step than z).
    baseline_epochs : int, optional
        Epochs of the full-model baseline (default ``epochs``).
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
        d_int90, the learning rate kept per run, and ``basis`` stating what the threshold
        is relative to. A run whose loss diverges counts as accuracy 0 (with a
        :class:`ConvergenceWarning`).

    References
    ----------
    Li, Farkhoor, Liu & Yosinski (2018), "Measuring the intrinsic dimension of objective
    landscapes", ICLR.
    """
    from ridgeline.train import coerce_tensors

    began = time.perf_counter()
    grid = _check_options(dims, threshold, baseline, epochs, seeds, search, projection, tol)
    rates = _rates(lr, "lr")
    base_rates = _rates(baseline_lr if baseline_lr is not None
                        else _FULL_MODEL_LR.get(optimizer, rates[0]), "baseline_lr")
    baseline_epochs = epochs if baseline_epochs is None else int(baseline_epochs)
    if baseline_epochs < 1:
        raise ConfigError(f"baseline_epochs must be ≥ 1, got {baseline_epochs}.")
    targets = coerce_tensors(data)[1]
    if targets.is_floating_point():
        raise DataError("the intrinsic dimension is defined by classification accuracy; the data "
                        "has float (regression) targets. Pass integer class labels.")
    if eval_data is not None:
        coerce_tensors(eval_data, "eval_data")
    num_params = sum(p.numel() for p in _build(model_fn, seed).parameters() if p.requires_grad)
    if num_params == 0:
        raise ConfigError("the model has no trainable parameters.")
    if grid[-1] > num_params:
        raise ConfigError(f"dims go up to {grid[-1]} but the model has only D = {num_params} "
                          f"trainable parameters; every d must satisfy 1 ≤ d ≤ {num_params}.")
    needed = projection_bytes(projection, num_params, grid[-1])
    if memory_budget is not None and needed > memory_budget:
        raise MemoryBudgetError(
            f"the {projection} projection for d = {grid[-1]} needs {needed / 2**20:.1f} MiB, over "
            f"the memory budget of {memory_budget / 2**20:.1f} MiB; use projection='fastfood' or "
            "'sparse', smaller dims, or a larger memory_budget.")
    runner = _Runner(data, eval_data if eval_data is not None else data,
                     dict(optimizer=optimizer, momentum=momentum, batch_size=batch_size, loss=loss,
                          progress=False))
    runs: dict[int, list[tuple[float, float | None, float]]] = {}
    total = (seeds * len(base_rates) if baseline == "measured" else 0) + len(grid) * seeds * len(rates)
    with progress_bar(total if search == "grid" else None, "intrinsic dimension", progress) as bar:
        base_runs: list[tuple[float, float | None, float]] = []
        if baseline == "measured":
            base_runs = [runner.best(lambda s=s: _build(model_fn, seed + s), seed + s, base_rates,
                                     baseline_epochs, bar) for s in range(seeds)]
            reference = sum(a for a, _, _ in base_runs) / seeds
        else:
            reference = float(baseline)
        target = threshold * reference

        def evaluate(d: int) -> float:
            if d not in runs:
                runs[d] = [runner.best(
                    lambda s=s: SubspaceModel(_build(model_fn, seed + s), d, projection=projection,
                                              seed=seed + s, memory_budget=memory_budget),
                    seed + s, rates, epochs, bar) for s in range(seeds)]
            return sum(a for a, _, _ in runs[d]) / seeds

        for d in grid:
            evaluate(d)
        if search == "bisect":
            _bisect(evaluate, runs, target, tol)

    ordered = sorted(runs)
    means = {d: sum(a for a, _, _ in runs[d]) / seeds for d in ordered}
    passing = [d for d in ordered if means[d] >= target]

    def column(i: int) -> tuple:
        return tuple(tuple(run[i] for run in runs[d]) for d in ordered)

    return IntrinsicDimension(
        dims=tuple(ordered), accuracies=column(0), baseline=reference,
        baseline_kind="measured" if baseline == "measured" else "given",
        threshold=float(threshold), d_int90=passing[0] if passing else None, target=target,
        baseline_accuracies=tuple(a for a, _, _ in base_runs), losses=column(1),
        learning_rates=column(2), baseline_learning_rates=tuple(r for _, _, r in base_runs),
        num_params=num_params, projection=projection, search=search,
        metric="test accuracy" if eval_data is not None else "train accuracy", epochs=epochs,
        baseline_epochs=baseline_epochs if baseline == "measured" else 0, seeds=seeds,
        seconds=time.perf_counter() - began,
        config={"optimizer": optimizer, "lr": list(rates),
                "baseline_lr": list(base_rates) if baseline == "measured" else None,
                "momentum": momentum, "batch_size": batch_size, "loss": loss, "seed": seed, "tol": tol})


class _Runner:
    """Trains a fresh model per learning rate and keeps the best held-out accuracy."""

    def __init__(self, data: Any, measure_on: Any, train_kw: dict) -> None:
        self.data, self.measure_on, self.train_kw = data, measure_on, train_kw

    def best(self, make: Callable[[], nn.Module], run_seed: int, rates: Sequence[float],
             epochs: int, bar) -> tuple[float, float | None, float]:
        """(accuracy, final train loss, learning rate) of the best of ``rates``."""
        from ridgeline.objective import Objective
        from ridgeline.train import train

        best: tuple[float, float | None, float] | None = None
        for rate in rates:
            model = make()
            try:
                result = train(model, self.data, lr=rate, seed=run_seed, epochs=epochs, **self.train_kw)
                _, acc = Objective(model, self.measure_on, self.train_kw["loss"],
                                   validate=False).loss_and_accuracy()
                outcome = (float(acc), float(result.final["train_loss"]), float(rate))
            except NonFiniteLossError as exc:
                warnings.warn(f"training diverged with lr={rate} (counted as accuracy 0): {exc}",
                              ConvergenceWarning, stacklevel=3)
                outcome = (0.0, None, float(rate))
            if best is None or outcome[0] > best[0]:
                best = outcome
            bar.advance(info=f"acc {outcome[0]:.3f}")
        assert best is not None  # rates is never empty (checked by _rates)
        return best


def _rates(value: Rates, name: str) -> list[float]:
    rates = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if not rates or any(not r > 0 for r in rates):
        raise ConfigError(f"{name} must be a positive number or a non-empty list of them, got {value!r}.")
    return rates


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
