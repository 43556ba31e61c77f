"""Linear paths between two networks: loss and accuracy along θ(α) = (1−α)θA + αθB,
barriers, and the normalisation fixes interpolated networks need (BatchNorm reset, REPAIR).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError, DataError, UnsupportedOperationError
from ridgeline.losses import LossFn, accuracy
from ridgeline.objective import Objective, as_objective
from ridgeline.params import check_same_structure, functional_call, named_buffers, named_parameters
from ridgeline.progress import progress_bar

__all__ = ["interpolate", "PathResult", "barrier", "reset_bn", "PathEngine", "alpha_grid",
           "all_parameters", "BARRIER_CONVENTION"]

Params = dict[str, torch.Tensor]

BARRIER_CONVENTION = ("max_α [L(θ(α)) − ((1−α) L(θA) + α L(θB))] (Frankle et al. 2020; "
                      "Entezari et al. 2022)")


def barrier(alphas: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    """(B, B_mid, α*) for a curve v(α) with v(0), v(1) at its ends.

    B = max_α [v(α) − ((1−α)v(0) + α v(1))] (Frankle et al. 2020; Entezari et al. 2022),
    B_mid = max_α v(α) − ½(v(0) + v(1)) (the convention of Git Re-Basin's code), and α*
    the α of B. Non-finite values make B NaN (any NaN) or +inf (any +inf).
    """
    alphas = [float(a) for a in alphas]
    values = [float(v) for v in values]
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan, math.nan
    if any(math.isinf(v) for v in values):
        worst = max(range(len(values)), key=lambda i: values[i])
        return math.inf, math.inf, alphas[worst]
    first, last = values[alphas.index(min(alphas))], values[alphas.index(max(alphas))]
    excess = [v - ((1 - a) * first + a * last) for a, v in zip(alphas, values)]
    top = max(range(len(values)), key=lambda i: excess[i])
    return excess[top], max(values) - 0.5 * (first + last), alphas[top]


@dataclass(frozen=True)
class PathResult:
    """Loss (and accuracy) along the linear path θ(α) = (1−α)θA + αθB.

    Attributes
    ----------
    alphas, losses : tuple[float, ...]
        The grid (sorted, both ends included) and the loss at each point, as evaluated
        (non-finite values are kept; see ``nonfinite_alphas``).
    accuracies : tuple[float, ...] or None
    barrier : float
        B = max_α [L(θ(α)) − ((1−α)L(θA) + αL(θB))] (Frankle et al. 2020; Entezari et al.
        2022), the default convention.
    barrier_midpoint_convention : float
        max_α L(θ(α)) − ½(L(θA) + L(θB)) (Git Re-Basin's code).
    error_barrier, error_barrier_midpoint_convention : float or None
        The same for the error 1 − accuracy.
    argmax_alpha : float
        The α where ``barrier`` is attained.
    nonfinite_alphas : tuple[float, ...]
        Points whose loss is NaN or infinite (then ``barrier`` is NaN or inf).
    normalization : str
        ``"none"``, ``"bn-reset"`` or ``"repair"``: how normalisation statistics of the
        interpolated networks were set.
    """

    alphas: tuple[float, ...]
    losses: tuple[float, ...]
    accuracies: tuple[float, ...] | None
    barrier: float
    barrier_midpoint_convention: float
    error_barrier: float | None
    error_barrier_midpoint_convention: float | None
    argmax_alpha: float
    nonfinite_alphas: tuple[float, ...] = ()
    normalization: str = "none"
    convention: str = BARRIER_CONVENTION
    label: str = "path"

    @property
    def errors(self) -> tuple[float, ...] | None:
        return None if self.accuracies is None else tuple(1.0 - a for a in self.accuracies)

    @property
    def endpoint_losses(self) -> tuple[float, float]:
        return self.losses[0], self.losses[-1]

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        return to_jsonable({
            "label": self.label, "alphas": list(self.alphas), "losses": list(self.losses),
            "accuracies": None if self.accuracies is None else list(self.accuracies),
            "barrier": self.barrier,
            "barrier_midpoint_convention": self.barrier_midpoint_convention,
            "error_barrier": self.error_barrier,
            "error_barrier_midpoint_convention": self.error_barrier_midpoint_convention,
            "argmax_alpha": self.argmax_alpha, "nonfinite_alphas": list(self.nonfinite_alphas),
            "normalization": self.normalization, "convention": self.convention})

    def plot(self, ax=None, *, metric: str = "loss", label: str | None = None, **style: Any):
        """The curve against α, with the straight line between its ends dashed."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(5, 3.2)
        if metric == "loss":
            values = self.losses
        elif metric in ("error", "accuracy") and self.accuracies is not None:
            values = self.errors if metric == "error" else self.accuracies
        else:
            raise ConfigError(f"metric must be 'loss', 'error' or 'accuracy' (with accuracies "
                              f"recorded), got {metric!r}.")
        text = label or f"{self.label} (B={self.barrier:.3g})" if metric == "loss" else (label or self.label)
        line, = ax.plot(self.alphas, values, marker="o", ms=3, label=text, **style)
        ax.plot([self.alphas[0], self.alphas[-1]], [values[0], values[-1]], ls="--", lw=0.8,
                color=line.get_color())
        ax.set_xlabel("α")
        ax.set_ylabel(metric)
        ax.legend()
        return ax


def all_parameters(model: nn.Module) -> Params:
    """Every parameter by name, frozen ones included: a path moves all of them."""
    return named_parameters(model, trainable_only=False)


def alpha_grid(points: int | Sequence[float]) -> list[float]:
    """``points`` evenly spaced α in [0, 1] (both ends), or the given α values sorted."""
    if isinstance(points, int):
        if points < 2:
            raise ConfigError(f"points must be at least 2 (both ends), got {points}.")
        return [i / (points - 1) for i in range(points)]
    grid = sorted({float(a) for a in points} | {0.0, 1.0})
    if grid[0] < 0 or grid[-1] > 1:
        raise ConfigError(f"α values must lie in [0, 1]; got {grid[0]} … {grid[-1]}.")
    return grid


# ----------------------------------------------------------------------------- normalisation
def _batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


@contextlib.contextmanager
def _bn_cumulative(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode with momentum=None (cumulative average); every other
    module in eval mode (no dropout). Restores modes and momenta afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for _, m in _batchnorms(model)]
    try:
        model.eval()
        for m, _ in momenta:
            m.train()
            m.momentum = None
        yield
    finally:
        for m, flag in modes:
            m.training = flag
        for m, momentum in momenta:
            m.momentum = momentum


def reset_statistics(model: nn.Module, params: Mapping[str, torch.Tensor],
                     buffers: Mapping[str, torch.Tensor], batches: Sequence[torch.Tensor]) -> Params:
    """Buffers with every BatchNorm's running statistics re-estimated at ``params``.

    Running mean and variance are reset (0 and 1), then ``batches`` are passed through the
    network with BatchNorm in train mode and momentum=None, so the new statistics are the
    cumulative averages of the batch means and (unbiased) batch variances; no gradient.
    """
    fresh = dict(buffers)
    for name, _ in _batchnorms(model):
        mean_key, var_key = _join(name, "running_mean"), _join(name, "running_var")
        count_key = _join(name, "num_batches_tracked")
        fresh[mean_key] = torch.zeros_like(buffers[mean_key])
        fresh[var_key] = torch.ones_like(buffers[var_key])
        if count_key in buffers:
            fresh[count_key] = torch.zeros_like(buffers[count_key])
    with torch.no_grad(), _bn_cumulative(model):
        for inputs in batches:
            functional_call(model, ({**params}, fresh), (inputs,))
    return fresh


def _channel_dim(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    return 1 if isinstance(weight, torch.Tensor) and weight.dim() > 2 else -1


def _shaped(vector: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * out.dim()
    shape[dim] = -1
    return vector.view(shape)


class _Repair:
    """REPAIR (Jordan et al. 2023): rescale each hidden channel's pre-activation so that its
    mean and standard deviation over the data equal the interpolation of the endpoints'.

    For layer ℓ at α: z' = (z − μ)/σ · σ*_α + μ*_α with μ*_α = (1−α)μ_A + αμ_B and
    σ*_α = (1−α)σ_A + ασ_B, applied by forward hooks, layer after layer in forward order
    (each correction changes the statistics downstream).
    """

    def __init__(self, model: nn.Module, spec: Any, batches: Sequence[torch.Tensor]) -> None:
        self.model, self.batches = model, batches
        names = []
        for tensor, axes in spec.axes.items():
            module_name, _, leaf = tensor.rpartition(".")
            if leaf == "weight" and len(axes) >= 2 and axes[0] is not None and module_name not in names:
                names.append(module_name)
        self.modules = {n: model.get_submodule(n) for n in names}
        self.corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.order: list[str] = []

    @contextlib.contextmanager
    def hooks(self, record: set[str] | None = None, stats: dict | None = None) -> Iterator[None]:
        handles = []

        def make(name: str, module: nn.Module):
            dim = _channel_dim(module)

            def hook(_module, _inputs, out):
                if name not in self.order:
                    self.order.append(name)
                if name in self.corrections:
                    scale, shift = self.corrections[name]
                    out = out * _shaped(scale, out, dim) + _shaped(shift, out, dim)
                if record is not None and name in record:
                    flat = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim]).double()
                    total = stats.setdefault(name, [0, 0.0, 0.0])
                    total[0] += flat.shape[0]
                    total[1] = total[1] + flat.sum(0)
                    total[2] = total[2] + (flat * flat).sum(0)
                return out

            return hook

        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(make(name, module)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def measure(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                names: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        stats: dict[str, list] = {}
        with torch.no_grad(), self.hooks(names, stats):
            for inputs in self.batches:
                functional_call(self.model, ({**params}, {**buffers}), (inputs,))
        out = {}
        for name, (count, total, squares) in stats.items():
            mean = total / count
            out[name] = (mean, (squares / count - mean ** 2).clamp_min(0).sqrt())
        return out

    def fit(self, params: Params, buffers: Params, ends: tuple[dict, dict], alpha: float) -> None:
        """Set the corrections for the network at ``params`` (α along the path)."""
        self.corrections = {}
        order = self.order or list(self.modules)
        for name in order:
            (mean_a, std_a), (mean_b, std_b) = ends[0][name], ends[1][name]
            target_mean = (1 - alpha) * mean_a + alpha * mean_b
            target_std = (1 - alpha) * std_a + alpha * std_b
            mean, std = self.measure(params, buffers, {name})[name]
            scale = target_std / std.clamp_min(1e-12)
            shift = target_mean - mean * scale
            dtype = next(iter(params.values())).dtype
            self.corrections[name] = (scale.to(dtype), shift.to(dtype))


def _input_batches(objective: Objective, limit: int | None) -> list[torch.Tensor]:
    batches = []
    for batch in objective.per_batch(shard=False):
        batches.append(batch.inputs)
        if limit is not None and len(batches) >= limit:
            break
    return batches


def reset_bn(model: nn.Module, data: Any, *, batches: int | None = None,
             batch_size: int | None = None) -> nn.Module:
    """A copy of ``model`` with its BatchNorm running statistics re-estimated on ``data``.

    The statistics are reset and recomputed from ``batches`` batches (all by default) in
    train mode with momentum=None, i.e. as cumulative averages, with no gradient — what
    interpolated or aligned BatchNorm networks need before they are evaluated (Jordan et
    al. 2023, "REPAIR"; Ainsworth et al. 2023, appendix).
    """
    import copy

    objective = Objective(model, data, batch_size=batch_size, validate=False)
    fresh = reset_statistics(model, all_parameters(model), named_buffers(model),
                             _input_batches(objective, batches))
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensor in out.named_buffers():
            tensor.copy_(fresh[name])
    return out


# ----------------------------------------------------------------------------- the engine
class PathEngine:
    """Evaluates loss/accuracy at parameter points of one architecture, with optional
    BatchNorm reset or REPAIR at each point. Shared by paths, layer-wise barriers and
    slices."""

    def __init__(self, objective: Objective, *, accuracy: bool = True, reset_data: Any = None,
                 reset_batches: int | None = None, repair: bool = False, spec: Any = None,
                 batch_size: int | None = None) -> None:
        self.objective = objective
        self.model = objective.model
        self.accuracy = bool(accuracy) and objective.is_classification
        self.has_bn = bool(_batchnorms(self.model))
        self.batches: list[torch.Tensor] = []
        self.normalization = "none"
        self.repair: _Repair | None = None
        if repair and self.has_bn and reset_data is None:
            # REPAIR on a BatchNorm network is a BatchNorm reset at every point; without
            # reset_bn= that reset would silently run on the evaluation data (the test split's
            # statistics when that is what is being evaluated). Refuse rather than warn: a
            # warning is lost inside a study, the barrier it produces is not.
            raise ConfigError(
                "repair=True on a network with BatchNorm means re-estimating its BatchNorm "
                "statistics at every point (for BatchNorm networks REPAIR is the BatchNorm "
                "reset, Jordan et al. 2023), and without reset_bn= that would use the "
                "evaluation data: test-set statistics when it is the test split. Pass "
                "reset_bn=training_data, or reset_bn=True to reset on the evaluation data "
                "deliberately.")
        if reset_data is not None or repair:
            source = (objective if reset_data is None or reset_data is True
                      else Objective(self.model, reset_data, objective.loss_fn,
                                     batch_size=batch_size, validate=False))
            self.batches = _input_batches(source, reset_batches)
            if not self.batches:
                raise DataError("the data for BatchNorm reset / REPAIR has no batch.")
        if self.has_bn and self.batches:
            self.normalization = "bn-reset"
        elif repair:
            if spec is None:
                from .permutation_spec import permutation_spec

                try:
                    spec = permutation_spec(self.model, example_input=self.batches[0][:2])
                except UnsupportedOperationError as exc:
                    raise UnsupportedOperationError(
                        f"REPAIR needs to know the hidden layers: {exc}") from exc
            self.repair = _Repair(self.model, spec, self.batches)
            self.normalization = "repair"
        elif self.has_bn:
            warnings.warn("the models have BatchNorm but reset_bn is None: interpolated networks "
                          "are evaluated with interpolated running statistics, which grossly "
                          "overstates barriers. Pass reset_bn=training_data.", UserWarning,
                          stacklevel=3)

    def endpoint_stats(self, params: Params, buffers: Params) -> dict | None:
        if self.repair is None:
            return None
        self.repair.corrections = {}
        stats = self.repair.measure(params, buffers, set(self.repair.modules))
        return stats

    def evaluate(self, params: Params, buffers: Params, *, alpha: float | None = None,
                 ends: tuple[dict, dict] | None = None) -> tuple[float, float | None]:
        """(loss, accuracy) at ``params``; NaN/inf are returned as they are."""
        if self.normalization == "bn-reset":
            buffers = reset_statistics(self.model, params, buffers, self.batches)
        objective, want_acc = self.objective, self.accuracy

        def both(x, y):
            out = objective.forward(params, x, buffers)
            loss = objective.loss_fn(out, y)
            acc = accuracy(out, y) if want_acc else loss * 0
            return {"loss": loss, "accuracy": acc}

        if self.repair is not None and ends is not None and alpha is not None and 0 < alpha < 1:
            self.repair.fit(params, buffers, ends, alpha)
            context = self.repair.hooks()
        else:
            context = contextlib.nullcontext()
        with torch.no_grad(), context:
            values = objective.batch_mean(both)
        if self.repair is not None:
            self.repair.corrections = {}
        return float(values["loss"]), (float(values["accuracy"]) if want_acc else None)

    def path(self, params_a: Params, params_b: Params, buffers_a: Params, buffers_b: Params, *,
             points: int | Sequence[float] = 25, refine: bool | int = False,
             progress: bool = False, label: str = "path") -> PathResult:
        """Evaluate θ(α) = (1−α)θA + αθB (and interpolated buffers) on the α grid; each
        point is computed directly from the endpoints, never by accumulating steps."""
        alphas = alpha_grid(points)
        ends = None
        if self.repair is not None:
            self.repair.order = []
            ends = (self.endpoint_stats(params_a, buffers_a), self.endpoint_stats(params_b, buffers_b))
        rounds = (4 if refine is True else int(refine)) if refine else 0
        values: dict[float, tuple[float, float | None]] = {}

        def run(grid: list[float], bar: Any) -> None:
            for alpha in grid:
                params = _lerp(params_a, params_b, alpha)
                buffers = _lerp(buffers_a, buffers_b, alpha)
                values[alpha] = self.evaluate(params, buffers, alpha=alpha, ends=ends)
                bar.advance()

        with progress_bar(len(alphas) + 2 * rounds, f"path {label}", progress) as bar:
            run(alphas, bar)
            for _ in range(rounds):
                grid = sorted(values)
                _, _, top = barrier(grid, [values[a][0] for a in grid])
                if not math.isfinite(top):
                    break
                i = grid.index(top)
                extra = [0.5 * (grid[j] + grid[j + 1]) for j in (i - 1, i) if 0 <= j < len(grid) - 1]
                run([a for a in extra if a not in values], bar)
        return make_path_result(sorted(values), values, self.accuracy, self.normalization, label)


def make_path_result(alphas: list[float], values: Mapping[float, tuple[float, float | None]],
                     accuracy: bool, normalization: str, label: str) -> PathResult:
    losses = [values[a][0] for a in alphas]
    accs = [values[a][1] for a in alphas] if accuracy else None
    b, b_mid, top = barrier(alphas, losses)
    eb = eb_mid = None
    if accs is not None:
        eb, eb_mid, _ = barrier(alphas, [1 - a for a in accs])
    bad = tuple(a for a, v in zip(alphas, losses) if not math.isfinite(v))
    if bad:
        warnings.warn(f"{label}: the loss is not finite at α = {list(bad)}; the barrier is "
                      f"{b}. The values are kept in the result.", RuntimeWarning, stacklevel=3)
    return PathResult(tuple(alphas), tuple(losses), None if accs is None else tuple(accs), b,
                      b_mid, eb, eb_mid, top, bad, normalization, BARRIER_CONVENTION, label)


def _lerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> Params:
    """(1−α)a + αb for floating tensors; integer tensors (counters) are taken from a. The
    ends are a and b exactly (a non-finite b must not leak into α = 0)."""
    if alpha == 0:
        return dict(a)
    if alpha == 1:
        return {k: (b[k] if v.is_floating_point() else v) for k, v in a.items()}
    return {k: (torch.lerp(v, b[k], alpha) if v.is_floating_point() else v) for k, v in a.items()}


def coerce_pair(model_a: Any, model_b: Any, data: Any, loss: str | LossFn,
                batch_size: int | None) -> tuple[Objective, nn.Module]:
    """The objective of model A on the data, after checking B has the same architecture."""
    objective = as_objective(model_a, data, loss=loss, batch_size=batch_size)
    if isinstance(model_b, Objective):
        model_b = model_b.model
    if not isinstance(model_b, nn.Module):
        raise TypeError(f"model_b must be a torch.nn.Module, got {type(model_b).__name__}.")
    check_same_structure(all_parameters(objective.model), all_parameters(model_b))
    check_same_structure(named_buffers(objective.model), named_buffers(model_b))
    return objective, model_b


def interpolate(model_a: nn.Module | Objective, model_b: nn.Module, data: Any = None, *,
                points: int | Sequence[float] = 25, loss: str | LossFn = "cross_entropy",
                reset_bn: Any = None, repair: bool = False, reset_batches: int | None = None,
                metrics: Sequence[str] = ("loss", "accuracy"), refine: bool | int = False,
                batch_size: int | None = None, progress: bool = False,
                label: str = "path") -> PathResult:
    """Loss and accuracy along the straight line between two networks, and its barrier.

    Evaluates θ(α) = (1−α)θA + αθB directly at each α of the grid (buffers such as
    BatchNorm running statistics are interpolated the same way, or re-estimated with
    ``reset_bn``), and reports the barrier

        B = max_α [L(θ(α)) − ((1−α)L(θA) + αL(θB))]     (Frankle et al. 2020; Entezari et al. 2022)

    plus Git Re-Basin's convention max_α L(θ(α)) − ½(L(θA) + L(θB)) and the same two for
    the error 1 − accuracy.

    Parameters
    ----------
    model_a : nn.Module or Objective
    model_b : nn.Module
        The same architecture as A (else ArchitectureMismatchError naming the tensors).
    data : (inputs, targets), Dataset or DataLoader; omit when model_a is an Objective.
    points : int or sequence of float
        Number of evenly spaced α in [0, 1] (both ends), or the α values.
    loss : "cross_entropy", "mse" or callable
    reset_bn : data or True, optional
        Training data for re-estimating BatchNorm statistics at every point (train mode,
        momentum=None, ``reset_batches`` batches, no gradient), endpoints included; ``True``
        re-estimates them on ``data`` itself. Without it BatchNorm networks get interpolated
        statistics (and a warning).
    repair : bool
        For networks without BatchNorm: REPAIR (Jordan et al. 2023) each hidden layer's
        channel statistics to the interpolation of the endpoints' (uses ``reset_bn`` data,
        or ``data``). For a network with BatchNorm, REPAIR is the BatchNorm reset, so it
        needs ``reset_bn=`` explicitly (ConfigError otherwise: the reset would silently run
        on the evaluation data) and the result's ``normalization`` is ``"bn-reset"``.
    metrics : sequence of {"loss", "accuracy"}
    refine : bool or int
        Rounds of adaptive refinement around the maximum (True = 4): each round evaluates
        the midpoints on both sides of the current argmax.

    Returns
    -------
    PathResult
        Non-finite losses are kept in ``losses`` and listed in ``nonfinite_alphas`` (the
        barrier is then NaN or inf); a RuntimeWarning says so.

    References
    ----------
    Frankle, Dziugaite, Roy & Carbin (2020), "Linear mode connectivity and the lottery ticket
    hypothesis"; Entezari, Sedghi, Saukh & Neyshabur (2022), "The role of permutation
    invariance in linear mode connectivity"; Ainsworth et al. (2023), "Git Re-Basin"; Jordan
    et al. (2023), "REPAIR: REnormalizing Permuted Activations for Interpolation Repair".
    """
    unknown = [m for m in metrics if m not in ("loss", "accuracy")]
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; choose from 'loss' and 'accuracy'.")
    objective, model_b = coerce_pair(model_a, model_b, data, loss, batch_size)
    engine = PathEngine(objective, accuracy="accuracy" in metrics, reset_data=reset_bn,
                        reset_batches=reset_batches, repair=repair, batch_size=batch_size)
    model = objective.model
    return engine.path(all_parameters(model), all_parameters(model_b), named_buffers(model),
                       named_buffers(model_b), points=points, refine=refine, progress=progress,
                       label=label)
