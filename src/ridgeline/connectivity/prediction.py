"""Second-order prediction of barrier heights (Singh et al. 2024, "Landscaping LMC").

Along the path f(α) = L(θA + αΔ), Δ = θB − θA, expand the loss to second order from each
endpoint half-way toward the other and average the two expansions:

    L(½) ≈ ½[L_A + ½ g_A·Δ + ⅛ ΔᵀH_AΔ] + ½[L_B − ½ g_B·Δ + ⅛ ΔᵀH_BΔ],

so the barrier at the midpoint, L(½) − ½(L_A + L_B), is predicted by

    B̂ = ¼ (g_A − g_B)·Δ + (ΔᵀH_AΔ + ΔᵀH_BΔ)/16.

B̂ is the mean of the two half-way second-order Taylor expansions. It is exact whenever
α ↦ f(α) is a cubic polynomial (the third-order terms of the two expansions, ±f‴/48,
cancel); otherwise its error is of the order of f⁗ along the path. It is *not* the
midpoint of the cubic Hermite interpolant of f, which uses the gradients only,
⅛ (g_A − g_B)·Δ (the two agree on cubics and differ otherwise). Each end costs one
forward-over-reverse pass (L, g·Δ and ΔᵀHΔ together).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value, jvp

from ridgeline.losses import LossFn
from ridgeline.objective import Objective
from ridgeline.params import named_buffers, sub
from ridgeline.progress import progress_bar

from .layerwise import hybrid, layer_groups
from .paths import PathEngine, all_parameters, coerce_pair

__all__ = ["predict_barrier", "BarrierPrediction", "LayerPrediction", "directional_terms",
           "predicted_barrier", "PREDICTOR"]

#: what B̂ is, recorded in every :class:`BarrierPrediction`
PREDICTOR = ("B̂ = ¼(g_A − g_B)·Δ + (ΔᵀH_AΔ + ΔᵀH_BΔ)/16: the mean of the second-order "
             "Taylor expansions of the loss from A and from B evaluated half-way, minus "
             "½(L_A + L_B); exact when the loss is cubic along the path (Singh et al. 2024); "
             "not the cubic Hermite midpoint ⅛(g_A − g_B)·Δ")


def directional_terms(objective: Objective, params: Mapping[str, torch.Tensor],
                      buffers: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
                      ) -> dict[str, float]:
    """L(θ), g·Δ and ΔᵀHΔ at θ in one pass over the data.

    One forward-over-reverse product per batch: ``jvp`` of θ ↦ (∇L, L) in direction Δ gives
    (HΔ, g·Δ) as its tangent; batches are combined with their sizes by
    :meth:`Objective.batch_mean` (and all-reduced under torch.distributed).
    """
    params = {k: v.detach() for k, v in params.items()}
    tangent = {k: delta[k].detach().to(params[k].dtype) for k in params}

    def batch(x, y):
        def loss_of(p):
            return objective.loss_fn(objective.forward(p, x, buffers), y)

        (_, value), (h_delta, g_delta) = jvp(grad_and_value(loss_of), (params,), (tangent,))
        curvature = sum((h_delta[k] * tangent[k]).sum() for k in tangent)
        return {"loss": value.detach(), "g_delta": g_delta.detach(),
                "delta_h_delta": curvature.detach()}

    values = objective.batch_mean(batch)
    return {k: float(v) for k, v in values.items()}


def predicted_barrier(at_a: Mapping[str, float], at_b: Mapping[str, float]) -> dict[str, float]:
    """B̂ = ¼(g_A − g_B)·Δ + (ΔᵀH_AΔ + ΔᵀH_BΔ)/16 from the terms at both ends: the mean of
    the second-order Taylor expansions from A and from B evaluated half-way, minus
    ½(L_A + L_B)."""
    gradient_term = 0.25 * (at_a["g_delta"] - at_b["g_delta"])
    curvature_term = 0.0625 * (at_a["delta_h_delta"] + at_b["delta_h_delta"])
    return {"predicted": gradient_term + curvature_term, "gradient_term": gradient_term,
            "curvature_term": curvature_term, "loss_a": at_a["loss"], "loss_b": at_b["loss"],
            "g_a_delta": at_a["g_delta"], "g_b_delta": at_b["g_delta"],
            "delta_h_a_delta": at_a["delta_h_delta"], "delta_h_b_delta": at_b["delta_h_delta"]}


@dataclass(frozen=True)
class LayerPrediction:
    """Predicted and measured barrier of one layer's path (A → A + Δ_ℓ)."""

    layer: str
    predicted: float
    measured: float | None
    measured_midpoint: float | None
    gradient_term: float
    curvature_term: float

    def to_dict(self) -> dict:
        return {"layer": self.layer, "predicted": self.predicted, "measured": self.measured,
                "measured_midpoint": self.measured_midpoint, "gradient_term": self.gradient_term,
                "curvature_term": self.curvature_term}


@dataclass(frozen=True)
class BarrierPrediction:
    """The second-order barrier prediction B̂ and, when measured, the real barrier.

    Attributes
    ----------
    predicted : float
        B̂ for the whole path A → B.
    measured : float or None
        The measured barrier max_α [L(θ(α)) − ((1−α)L_A + αL_B)].
    measured_midpoint : float or None
        L(θ(½)) − ½(L_A + L_B), the quantity B̂ approximates (equal to it when the loss is
        cubic along the path).
    terms : dict
        gradient_term ¼(g_A − g_B)·Δ, curvature_term (ΔᵀH_AΔ + ΔᵀH_BΔ)/16, the endpoint
        losses, g·Δ and ΔᵀHΔ at each end.
    layers : tuple[LayerPrediction, ...] or None
        With ``layerwise=True``.
    spearman, spearman_pvalue : float or None
        Spearman rank correlation of predicted vs measured layer barriers.
    spearman_midpoint : float or None
        The same against the measured midpoint barriers.
    predictor : str
        What B̂ is (:data:`PREDICTOR`): the mean of the two half-way second-order Taylor
        expansions, not the cubic Hermite midpoint.
    """

    predicted: float
    measured: float | None
    measured_midpoint: float | None
    terms: dict[str, float]
    layers: tuple[LayerPrediction, ...] | None = None
    spearman: float | None = None
    spearman_pvalue: float | None = None
    spearman_midpoint: float | None = None
    predictor: str = PREDICTOR

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        return to_jsonable({
            "predicted": self.predicted, "measured": self.measured,
            "measured_midpoint": self.measured_midpoint, "terms": dict(self.terms),
            "layers": None if self.layers is None else [r.to_dict() for r in self.layers],
            "spearman": self.spearman, "spearman_pvalue": self.spearman_pvalue,
            "spearman_midpoint": self.spearman_midpoint, "predictor": self.predictor})

    def plot(self, ax=None):
        """Predicted vs measured barrier per layer (with the line y = x)."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(4.2, 4)
        rows = list(self.layers or [])
        points = [(r.predicted, r.measured, r.layer) for r in rows if r.measured is not None]
        if not points and self.measured is not None:
            points = [(self.predicted, self.measured, "whole path")]
        for x, y, name in points:
            ax.scatter([x], [y], s=24)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        finite = [v for p in points for v in p[:2] if math.isfinite(v)]
        if finite:
            low, high = min(finite + [0.0]), max(finite)
            ax.plot([low, high], [low, high], ls="--", lw=0.8, color="grey")
        ax.set_xlabel("predicted barrier B̂")
        ax.set_ylabel("measured barrier")
        title = "barrier prediction"
        if self.spearman is not None and math.isfinite(self.spearman):
            title += f" (Spearman {self.spearman:.2f})"
        ax.set_title(title)
        return ax


def _spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and b is not None and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return float(result.statistic), float(result.pvalue)


def _midpoint_excess(engine: PathEngine, params_a, params_b, buffers_a, buffers_b,
                     path: Any) -> float:
    """L(θ(½)) − ½(L_A + L_B), from the path when ½ is on its grid."""
    loss_a, loss_b = path.losses[0], path.losses[-1]
    if 0.5 in path.alphas:
        return path.losses[path.alphas.index(0.5)] - 0.5 * (loss_a + loss_b)
    mid = {k: torch.lerp(v, params_b[k], 0.5) for k, v in params_a.items()}
    mid_buffers = {k: (torch.lerp(v, buffers_b[k], 0.5) if v.is_floating_point() else v)
                   for k, v in buffers_a.items()}
    return engine.evaluate(mid, mid_buffers)[0] - 0.5 * (loss_a + loss_b)


def predict_barrier(model_a: nn.Module | Objective, model_b: nn.Module, data: Any = None, *,
                    layerwise: bool = False,
                    layers: str | Sequence[str] | Mapping[str, Sequence[str]] = "module",
                    measure: bool = True, points: int | Sequence[float] = 25,
                    loss: str | LossFn = "cross_entropy", batch_size: int | None = None,
                    progress: bool = False) -> BarrierPrediction:
    """Predict the loss barrier between two networks from gradients and curvature.

    With Δ = θB − θA, gradients g and Hessians H of the loss at both ends,

        B̂ = ¼ (g_A − g_B)·Δ + (ΔᵀH_AΔ + ΔᵀH_BΔ)/16,

    the mean of the second-order Taylor expansions of the loss from A and from B evaluated
    half-way, minus ½(L_A + L_B): a prediction of the midpoint barrier
    L(θ(½)) − ½(L_A + L_B), exact when the loss is cubic in α (it is not the cubic Hermite
    midpoint, ⅛ (g_A − g_B)·Δ, which has no curvature term). Each end costs one pass over
    the data (a forward-over-reverse product gives L, g·Δ and ΔᵀHΔ together).

    With ``layerwise=True`` the same prediction is made for every layer's path A → C_ℓ =
    A + Δ_ℓ (only layer ℓ moves; gradients and HVPs at A and C_ℓ, Δ = Δ_ℓ), and compared
    with the measured layer barriers by Spearman rank correlation.

    Parameters
    ----------
    layerwise : bool
    layers : "module", "tensor", list or dict
        Grouping of parameters into layers (see :func:`layer_groups`).
    measure : bool
        Also measure the barriers along the paths (``points`` evaluations per path).
    points, loss, batch_size, progress
        As in :func:`interpolate`.

    Returns
    -------
    BarrierPrediction

    Notes
    -----
    The models are evaluated in eval mode (BatchNorm uses each model's running statistics;
    hybrids and midpoints use A's, interpolated toward B's on the whole path).

    References
    ----------
    Singh, Ghosh, Karimireddy & Jaggi (2024), "Landscaping linear mode connectivity"
    (mountainside-and-ridge picture); Adilova et al. (2024), "Layer-wise linear mode
    connectivity".
    """
    objective, model_b = coerce_pair(model_a, model_b, data, loss, batch_size)
    engine = PathEngine(objective, accuracy=False, batch_size=batch_size)
    params_a, params_b = all_parameters(objective.model), all_parameters(model_b)
    buffers_a, buffers_b = named_buffers(objective.model), named_buffers(model_b)
    delta = sub(params_b, params_a)
    groups = layer_groups(params_a, layers) if layerwise else {}
    steps = 2 + (2 * len(groups))
    with progress_bar(steps, "barrier prediction", progress) as bar:
        terms = predicted_barrier(directional_terms(objective, params_a, buffers_a, delta),
                                  directional_terms(objective, params_b, buffers_b, delta))
        bar.advance(2)
        measured = measured_mid = None
        if measure:
            path = engine.path(params_a, params_b, buffers_a, buffers_b, points=points)
            measured = path.barrier
            measured_mid = _midpoint_excess(engine, params_a, params_b, buffers_a, buffers_b,
                                            path)
        rows = []
        for layer, names in groups.items():
            chosen = set(names)
            delta_l = {k: (v if k in chosen else torch.zeros_like(v)) for k, v in delta.items()}
            end = hybrid(params_a, params_b, names)
            layer_terms = predicted_barrier(
                directional_terms(objective, params_a, buffers_a, delta_l),
                directional_terms(objective, end, buffers_a, delta_l))
            m = m_mid = None
            if measure:
                path = engine.path(params_a, end, buffers_a, buffers_a, points=points, label=layer)
                m = path.barrier
                m_mid = _midpoint_excess(engine, params_a, end, buffers_a, buffers_a, path)
            rows.append(LayerPrediction(layer, layer_terms["predicted"], m, m_mid,
                                        layer_terms["gradient_term"], layer_terms["curvature_term"]))
            bar.advance(2)
    spearman = pvalue = spearman_mid = None
    if rows and measure:
        spearman, pvalue = _spearman([r.predicted for r in rows], [r.measured for r in rows])
        spearman_mid, _ = _spearman([r.predicted for r in rows], [r.measured_midpoint for r in rows])
    return BarrierPrediction(terms["predicted"], measured, measured_mid, terms,
                             tuple(rows) if layerwise else None, spearman, pvalue, spearman_mid)
