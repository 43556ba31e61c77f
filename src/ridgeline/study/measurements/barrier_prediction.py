"""Measurement ``barrier_prediction``: the second-order barrier prediction of Singh et al.
(2024) against the measured barriers, for the whole path and layer by layer."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.options import WeightMatchingOptions, restarts_problem
from ridgeline.study.registry import register_measurement


class BarrierPredictionOptions(WeightMatchingOptions):
    models: list[str] = Field(["a", "b"], min_length=2, max_length=2)  # the two compared
    layers: Literal["module", "tensor"] = "module"  # "module" (weight and bias together) or "tensor"
    points: int = 25
    split: str = "train"
    subset: int | None = None
    align: Literal["weights", "activations"] | None = None  # align B to A first: None, "weights" or "activations"


def _summary(record: dict) -> dict:
    result = record["result"]
    return {"models": " vs ".join(record["options"]["models"]),
            "aligned": record["options"].get("align") or "no",
            "predicted": result["predicted"], "measured": result["measured"],
            "measured midpoint": result["measured_midpoint"],
            "layers": len(result["layers"] or []), "Spearman": result["spearman"]}


def _report(record: dict) -> str:
    result = record["result"]
    rows = [{"layer": "whole path", "predicted": result["predicted"],
             "measured": result["measured"], "measured midpoint": result["measured_midpoint"],
             "gradient term": result["terms"]["gradient_term"],
             "curvature term": result["terms"]["curvature_term"]}]
    layers = result["layers"] or []
    rows += [{"layer": r["layer"], "predicted": r["predicted"], "measured": r["measured"],
              "measured midpoint": r["measured_midpoint"], "gradient term": r["gradient_term"],
              "curvature term": r["curvature_term"]} for r in layers]
    fig, axes = new_figure(9.5, 3.8, ncols=2)
    for ax, key, label in ((axes[0], "measured", "measured barrier (max over α)"),
                           (axes[1], "measured_midpoint", "measured L(½) − ½(L_A + L_B)")):
        points = [(r["predicted"], r[key], r["layer"]) for r in layers
                  if r[key] is not None and r["predicted"] is not None]
        for x, y, name in points:
            ax.scatter([x], [y], s=26)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        values = [v for p in points for v in p[:2] if math.isfinite(v)]
        if values:
            low, high = min(values + [0.0]), max(values + [0.0])
            ax.plot([low, high], [low, high], ls="--", lw=0.8, color="grey")
        ax.set_xlabel("predicted B̂ = ¼(g_A−g_C)·Δ + (Δᵀ H_A Δ + Δᵀ H_C Δ)/16")
        ax.set_ylabel(label)
    spearman = result.get("spearman")
    axes[0].set_title(f"per layer, Spearman {fmt(spearman, 3)}")
    axes[1].set_title(f"per layer, Spearman {fmt(result.get('spearman_midpoint'), 3)}")
    caption = ("Predicted vs measured barrier of each layer's path A → A + Δ_ℓ (only layer ℓ "
               "moves). The prediction targets the midpoint barrier (right); it is exact when "
               "the loss is cubic along the path.")
    return figure_html(fig, caption=caption) + table_html(rows)


def _check(config, options: BarrierPredictionOptions) -> list[str]:
    return restarts_problem(options.restarts, options.align == "weights")


@register_measurement("barrier_prediction", options=BarrierPredictionOptions, report=_report,
                      summary=_summary, check=_check,
                      description="Second-order barrier prediction vs measured barriers, "
                                  "whole path and per layer (Spearman).")
def run_barrier_prediction(ctx, options: BarrierPredictionOptions) -> dict:
    """B̂ from gradients and Hessian-vector products at the ends vs the measured barriers."""
    from ridgeline.connectivity import align, predict_barrier

    name_a, name_b = options.models
    model_a, model_b = ctx.model(name_a), ctx.model(name_b)
    data = ctx.dataset(options.split)
    if options.subset:
        data = data.subset(options.subset)
    restarts = None
    if options.align:
        weights = options.align == "weights"
        aligned = align(model_a, model_b, method=options.align, data=ctx.dataset("train"),
                        seed=ctx.seed, restarts=options.restarts if weights else None)
        model_b = aligned.model
        if weights:
            from ridgeline.study.options import used_restarts

            restarts = used_restarts(options.restarts, aligned.spec)
    result = predict_barrier(model_a, model_b, data, layerwise=True, layers=options.layers,
                             points=options.points, progress=ctx.progress)
    out = result.to_dict()
    if restarts is not None:
        out["restarts"] = restarts
    return out
