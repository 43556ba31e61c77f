"""The merge planner: predict the loss of a merged network from gradients and curvature at
the models being merged, before evaluating it, and rank candidate merges by it.

For models θ_1 … θ_N with weights w_i (Σ w_i = 1) and a merged point θ_m, expand the loss
to second order around every model and average the expansions with the weights:

    L̂(θ_m) = Σ_i w_i [L_i + g_i·δ_i + ½ δ_iᵀ H_i δ_i],      δ_i = θ_m − θ_i.

For two models merged at their midpoint (δ_A = Δ/2, δ_B = −Δ/2, Δ = θ_B − θ_A) this is
½(L_A + L_B) + ¼(g_A − g_B)·Δ + (ΔᵀH_AΔ + ΔᵀH_BΔ)/16: the mean endpoint loss plus the
barrier prediction B̂ of :func:`ridgeline.connectivity.predict_barrier`. Each model costs
one pass over the data (one forward-over-reverse product gives L_i, g_i·δ_i, δ_iᵀH_iδ_i).
See docs/merging.md for the derivation.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ridgeline.connectivity.prediction import directional_terms
from ridgeline.errors import ConfigError
from ridgeline.losses import LossFn
from ridgeline.objective import Objective
from ridgeline.params import named_buffers, named_parameters
from ridgeline.progress import progress_bar

from .core import METHODS, TASK_METHODS, MergeResult, merge

__all__ = ["predict_merge", "predicted_merge_loss", "MergePlan", "MergeCandidate",
           "default_candidates"]


def predicted_merge_loss(objective: Objective, endpoints: Sequence[nn.Module],
                         merged: nn.Module | Mapping[str, torch.Tensor],
                         weights: Sequence[float]) -> dict[str, float]:
    """L̂(θ_m) = Σ_i w_i [L_i + g_i·δ_i + ½ δ_iᵀH_iδ_i] with δ_i = θ_m − θ_i and its parts.

    Returns ``predicted``, ``mean_loss`` Σ w_i L_i, ``gradient_term`` Σ w_i g_i·δ_i,
    ``curvature_term`` ½ Σ w_i δ_iᵀH_iδ_i and ``spread`` Σ w_i ‖δ_i‖² (how far the merge
    sits from the models: what alignment shrinks). Weights are normalised.
    """
    total = float(sum(weights))
    w = [float(v) / total for v in weights]
    target = (named_parameters(merged, trainable_only=False) if isinstance(merged, nn.Module)
              else dict(merged))
    parts = {"mean_loss": 0.0, "gradient_term": 0.0, "curvature_term": 0.0, "spread": 0.0}
    per_model = []
    for weight, model in zip(w, endpoints):
        params = named_parameters(model, trainable_only=False)
        delta = {k: target[k] - v for k, v in params.items()}
        terms = directional_terms(objective, params, named_buffers(model), delta)
        spread = sum(float(d.double().pow(2).sum()) for d in delta.values())
        per_model.append({**terms, "spread": spread})
        parts["mean_loss"] += weight * terms["loss"]
        parts["gradient_term"] += weight * terms["g_delta"]
        parts["curvature_term"] += 0.5 * weight * terms["delta_h_delta"]
        parts["spread"] += weight * spread
    predicted = parts["mean_loss"] + parts["gradient_term"] + parts["curvature_term"]
    return {"predicted": predicted, **parts, "per_model": per_model}


@dataclass(frozen=True)
class MergeCandidate:
    """One candidate merge: its options, the predicted loss and (when measured) the real one.

    ``predicted_excess`` and ``measured_excess`` are relative to Σ w_i L_i, the weighted
    mean loss of the models merged (for two models at the midpoint, the barrier).
    ``spread`` Σ w_i ‖θ_m − θ_i‖² and ``details`` (MergeMany rounds, units each model moved,
    Fisher fallbacks) describe the alignment the merge reached.
    """

    label: str
    options: dict
    predicted: float
    mean_loss: float
    gradient_term: float
    curvature_term: float
    spread: float
    measured: float | None = None
    accuracy: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def predicted_excess(self) -> float:
        return self.predicted - self.mean_loss

    @property
    def measured_excess(self) -> float | None:
        return None if self.measured is None else self.measured - self.mean_loss

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        return to_jsonable({
            "label": self.label, "options": dict(self.options), "predicted": self.predicted,
            "measured": self.measured, "mean_loss": self.mean_loss,
            "predicted_excess": self.predicted_excess, "measured_excess": self.measured_excess,
            "gradient_term": self.gradient_term, "curvature_term": self.curvature_term,
            "spread": self.spread, "accuracy": self.accuracy, "eval_loss": self.eval_loss,
            "eval_accuracy": self.eval_accuracy, "seconds": self.seconds,
            "details": dict(self.details)})


@dataclass(frozen=True)
class MergePlan:
    """Candidate merges ranked by predicted loss, with how well the ranking held.

    Attributes
    ----------
    candidates : tuple[MergeCandidate, ...]
        In ranking order (lowest predicted loss first).
    endpoints : tuple[dict, ...]
        Loss and accuracy of every input model (on ``data`` and, if given, ``eval_data``).
    spearman, kendall : float or None
        Rank correlation of predicted vs measured loss over the candidates.
    best_predicted, best_measured : str or None
        Labels of the candidate predicted best and of the one measured best.
    regret : float or None
        Measured loss of the predicted-best candidate minus the best measured loss.
    """

    candidates: tuple[MergeCandidate, ...]
    endpoints: tuple[dict, ...]
    spearman: float | None
    spearman_pvalue: float | None
    kendall: float | None
    best_predicted: str | None
    best_measured: str | None
    regret: float | None

    @property
    def ranking(self) -> list[str]:
        return [c.label for c in self.candidates]

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        return to_jsonable({
            "candidates": [c.to_dict() for c in self.candidates],
            "endpoints": list(self.endpoints), "ranking": self.ranking,
            "spearman": self.spearman, "spearman_pvalue": self.spearman_pvalue,
            "kendall": self.kendall, "best_predicted": self.best_predicted,
            "best_measured": self.best_measured, "regret": self.regret})

    def plot(self, ax=None):
        """Predicted vs measured loss of every candidate, with the line y = x."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(4.6, 4.2)
        points = [(c.predicted, c.measured, c.label) for c in self.candidates
                  if c.measured is not None and math.isfinite(c.predicted)
                  and math.isfinite(c.measured)]
        for x, y, name in points:
            ax.scatter([x], [y], s=22)
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if points:
            values = [v for p in points for v in p[:2]]
            low, high = min(values), max(values)
            ax.plot([low, high], [low, high], ls="--", lw=0.8, color="grey")
            ax.set_xscale("log" if low > 0 and high / low > 30 else "linear")
            ax.set_yscale("log" if low > 0 and high / low > 30 else "linear")
        ax.set_xlabel("predicted loss L̂(θ_merged)")
        ax.set_ylabel("measured loss")
        title = "merge planner"
        if self.spearman is not None:
            title += f" (Spearman {self.spearman:.2f})"
        ax.set_title(title)
        return ax


def _label(options: Mapping[str, Any]) -> str:
    text = str(options.get("method", "average"))
    extras = [f"{k}={v}" for k, v in options.items() if k not in ("method", "align")]
    if extras:
        text += "(" + ", ".join(extras) + ")"
    return text + (f" + {options['align']}" if options.get("align") else "")


def default_candidates(*, methods: Sequence[str] | None = None,
                       align: Sequence[str | None] = (None, "weights"),
                       has_base: bool = False) -> list[dict]:
    """methods × align; the task-vector methods only with a base."""
    if methods is None:
        methods = [m for m in METHODS if has_base or m not in TASK_METHODS]
    return [{"method": m, "align": a} for m, a in itertools.product(methods, align)]


def _rank_correlations(x: Sequence[float], y: Sequence[float]
                       ) -> tuple[float | None, float | None, float | None]:
    from scipy.stats import kendalltau, spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and b is not None
             and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None, None, None
    xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = spearmanr(xs, ys)
        k = kendalltau(xs, ys)
    return float(s.statistic), float(s.pvalue), float(k.statistic)


def predict_merge(models: Sequence[nn.Module], data: Any, *,
                  candidates: Sequence[Mapping[str, Any]] | None = None,
                  methods: Sequence[str] | None = None,
                  align: Sequence[str | None] = (None, "weights"),
                  base: nn.Module | None = None, weights: Sequence[float] | None = None,
                  reset_bn: Any = None, measure: bool = True, eval_data: Any = None,
                  merge_data: Any = None,
                  loss: str | LossFn = "cross_entropy", batch_size: int | None = None,
                  seed: int | None = 0, progress: bool = False, **merge_options: Any
                  ) -> MergePlan:
    """Predict, rank and (optionally) check candidate merges of ``models``.

    For every candidate (``methods`` × ``align`` by default, or explicit ``candidates``:
    dicts of :func:`merge` keyword arguments) the merge is formed — parameter arithmetic
    and alignment only — and its loss on ``data`` is predicted from the models being
    merged, without evaluating the merged network:

        L̂(θ_m) = Σ_i w_i [L_i + g_i·δ_i + ½ δ_iᵀ H_i δ_i],      δ_i = θ_m − θ_i,

    the weighted mean of the second-order Taylor expansions of the loss around each
    (aligned) model. For two models at their midpoint it is ½(L_A + L_B) + B̂, the barrier
    prediction of Singh et al. (2024). Candidates are ranked by L̂; with ``measure=True``
    the merged networks are evaluated (loss and accuracy on ``data``, and on ``eval_data``
    when given) and the ranking is scored by Spearman's and Kendall's rank correlations and
    the regret of picking the predicted best.

    Parameters
    ----------
    models : sequence of nn.Module
    data : (inputs, targets), Dataset or DataLoader
        Where the loss is predicted and measured; also the Fisher and activation-matching
        data of the candidates.
    candidates : sequence of dict, optional
        E.g. ``[{"method": "average"}, {"method": "ties", "density": 0.1, "align": None}]``.
    methods, align
        The default grid when ``candidates`` is omitted.
    base, weights, reset_bn, seed, **merge_options
        Passed to every :func:`merge` (a candidate's own keys win).
    measure : bool
    eval_data : data, optional
        Held-out data on which the merged networks' loss and accuracy are also reported.
    merge_data : data or list of data (one per model), optional
        The data of the merges themselves (Fisher, activation matching) when it is not
        ``data``.

    Returns
    -------
    MergePlan

    Notes
    -----
    The prediction uses each model's own BatchNorm statistics; a measured merge with
    ``reset_bn`` uses re-estimated ones. The expansion is local: it is accurate when the
    merged point is close to the models relative to the curvature scale (aligned merges,
    fine-tunes of one base) and overestimates the loss far from them, where the quadratic
    keeps growing while the real loss saturates; ranks survive that better than values.

    References
    ----------
    Singh, Ghosh, Karimireddy & Jaggi (2024), "Landscaping linear mode connectivity";
    Ainsworth et al. (2023), "Git Re-Basin"; Matena & Raffel (2022).
    """
    if candidates is None:
        candidates = default_candidates(methods=methods, align=align, has_base=base is not None)
    candidates = [dict(c) for c in candidates]
    if not candidates:
        raise ConfigError("no candidate merges: pass candidates=[{...}] or methods=[...].")
    allowed = set(inspect.signature(merge).parameters) - {"models"}
    for c in candidates:
        unknown = set(c) - allowed
        if unknown:
            raise ConfigError(f"candidate {c} has unknown merge options {sorted(unknown)}.")
    if isinstance(models, nn.Module) or not models:
        raise ConfigError("models must be a non-empty list of torch.nn.Module.")
    objective = Objective(models[0], data, loss, batch_size=batch_size)
    if eval_data is not None:
        Objective(objective.model, eval_data, loss, batch_size=batch_size)  # validate early
    endpoints = []
    for model in models:  # each with its own buffers (BatchNorm statistics)
        row = dict(zip(("loss", "accuracy"), Objective(
            model, data, loss, batch_size=batch_size, validate=False).loss_and_accuracy()))
        if eval_data is not None:
            row.update(zip(("eval_loss", "eval_accuracy"), Objective(
                model, eval_data, loss, batch_size=batch_size,
                validate=False).loss_and_accuracy()))
        endpoints.append(row)
    rows: list[MergeCandidate] = []
    with progress_bar(len(candidates), "merge planner", progress) as bar:
        for options in candidates:
            kwargs = {"base": base, "weights": weights, "reset_bn": reset_bn, "seed": seed,
                      "data": data if merge_data is None else merge_data, "batch_size": batch_size, **merge_options, **options}
            result: MergeResult = merge(models, **kwargs)
            terms = predicted_merge_loss(objective, result.endpoints, result.model,
                                         result.weights)
            measured = accuracy = eval_loss = eval_accuracy = None
            if measure:
                check = Objective(result.model, data, loss, batch_size=batch_size,
                                  validate=False)
                measured, accuracy = check.loss_and_accuracy()
                if eval_data is not None:
                    eval_loss, eval_accuracy = Objective(
                        result.model, eval_data, loss, batch_size=batch_size,
                        validate=False).loss_and_accuracy()
            rows.append(MergeCandidate(_label(options), options, terms["predicted"],
                                       terms["mean_loss"], terms["gradient_term"],
                                       terms["curvature_term"], terms["spread"], measured,
                                       accuracy, eval_loss, eval_accuracy, result.seconds,
                                       dict(result.details)))
            bar.advance()
    rows.sort(key=lambda c: (not math.isfinite(c.predicted), c.predicted))
    spearman = pvalue = kendall = None
    best_measured = regret = None
    if measure:
        spearman, pvalue, kendall = _rank_correlations([c.predicted for c in rows],
                                                       [c.measured for c in rows])
        finite = [c for c in rows if c.measured is not None and math.isfinite(c.measured)]
        if finite:
            best = min(finite, key=lambda c: c.measured)
            best_measured = best.label
            if rows[0].measured is not None and math.isfinite(rows[0].measured):
                regret = rows[0].measured - best.measured
    return MergePlan(tuple(rows), tuple(endpoints), spearman, pvalue, kendall,
                     rows[0].label if rows else None, best_measured, regret)
