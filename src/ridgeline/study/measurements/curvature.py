"""Measurement ``curvature``: Hessian spectrum, trace, density, sharpness and gradient overlap
of each listed model of the study, on (a subset of) its training data."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement


class CurvatureOptions(Options):
    models: list[str] = ["a", "b"]
    subset: int | None = Field(1000, ge=1)
    k: int = Field(5, ge=1)
    tol: float = Field(1e-3, gt=0)
    trace: bool = True
    trace_method: Literal["hutchinson", "hutch++"] = "hutchinson"
    trace_rtol: float = Field(0.05, gt=0)
    density: bool = True
    runs: int = Field(5, ge=1)
    steps: int = Field(40, ge=2)
    sharpness: bool = True
    rho_worst: float = Field(0.002, gt=0)
    rho_average: float = Field(0.1, gt=0)
    sharpness_steps: int = Field(20, ge=1)
    sharpness_samples: int = Field(20, ge=2)
    overlap_k: int = Field(10, ge=0)


def _measure_model(model, data, options: CurvatureOptions, seed: int, progress: bool) -> dict:
    from ridgeline import Objective
    from ridgeline.curvature import (
        CurvatureOperator,
        density,
        gradient_overlap,
        sharpness,
        top_eigenvalues,
        trace,
    )

    objective = Objective(model, data)
    operator = CurvatureOperator(objective, "hessian")
    out: dict = {"examples": objective.num_examples, "parameters": operator.shape[0],
                 "notes": list(operator.notes), "seconds": {}}
    began = time.perf_counter()
    k = max(options.k, options.overlap_k)
    spectrum = top_eigenvalues(operator, k=k, tol=options.tol, seed=seed, progress=progress)
    out["top"] = {**spectrum.to_dict(), "values": spectrum.values[:options.k].tolist(),
                  "residuals": spectrum.residuals[:options.k].tolist(),
                  "relative_residuals": spectrum.relative_residuals[:options.k].tolist()}
    out["seconds"]["top"] = time.perf_counter() - began
    if options.overlap_k:
        began = time.perf_counter()
        out["overlap"] = gradient_overlap(operator, k=options.overlap_k, spectrum=spectrum).to_dict()
        out["seconds"]["overlap"] = time.perf_counter() - began
    if options.trace:
        began = time.perf_counter()
        out["trace"] = trace(operator, method=options.trace_method, rtol=options.trace_rtol,
                             seed=seed, block_size=4, progress=progress).to_dict()
        out["seconds"]["trace"] = time.perf_counter() - began
    if options.density:
        began = time.perf_counter()
        result = density(operator, runs=options.runs, steps=options.steps, seed=seed,
                          points=400, progress=progress)
        out["density"] = {**result.to_dict(), "nodes": None, "weights": None}
        out["seconds"]["density"] = time.perf_counter() - began
    if options.sharpness:
        began = time.perf_counter()
        worst = sharpness(objective, kind="worst", rho=options.rho_worst, norm="inf",
                          steps=options.sharpness_steps, seed=seed, progress=progress)
        average = sharpness(objective, kind="average", rho=options.rho_average, norm=2,
                            samples=options.sharpness_samples, seed=seed, progress=progress)
        out["sharpness"] = {"worst": worst.to_dict(), "average": average.to_dict()}
        out["seconds"]["sharpness"] = time.perf_counter() - began
    return out


def _summary(record: dict) -> dict:
    row: dict = {}
    for name, res in record["result"]["models"].items():
        row[f"λ_max ({name})"] = res["top"]["values"][0]
        if "trace" in res:
            row[f"trace ({name})"] = res["trace"]["value"]
        if "sharpness" in res:
            row[f"worst sharpness ({name})"] = res["sharpness"]["worst"]["value"]
            row[f"average sharpness ({name})"] = res["sharpness"]["average"]["value"]
        if "overlap" in res:
            row[f"grad overlap ({name})"] = res["overlap"]["value"]
    return row


def _model_rows(models: dict) -> list[dict]:
    rows = []
    for name, res in models.items():
        row = {"model": name, "examples": res["examples"], "parameters": res["parameters"]}
        for i, value in enumerate(res["top"]["values"], 1):
            row[f"λ{i}"] = value
        row["max rel. residual"] = max(res["top"]["relative_residuals"])
        if "trace" in res:
            row["trace"] = f"{fmt(res['trace']['value'])} ± {fmt(res['trace']['stderr'])}"
        if "overlap" in res:
            row[f"‖P_top{res['overlap']['k']} g‖²/‖g‖²"] = res["overlap"]["value"]
        if "sharpness" in res:
            worst, average = res["sharpness"]["worst"], res["sharpness"]["average"]
            row[f"worst ℓ∞ adaptive (ρ={worst['rho']:g})"] = worst["value"]
            row[f"average ℓ2 adaptive (ρ={average['rho']:g})"] = (
                f"{fmt(average['value'])} ± {fmt(average['stderr'])}")
        rows.append(row)
    return rows


def _cost_rows(models: dict) -> list[dict]:
    rows = []
    for name, res in models.items():
        row = {"model": name, "top-k HVPs": res["top"]["matvecs"]}
        if "trace" in res:
            row["trace HVPs"] = res["trace"]["matvecs"]
        if "density" in res:
            row["density HVPs"] = res["density"]["matvecs"]
        row.update({f"{key} (s)": value for key, value in res["seconds"].items()})
        rows.append(row)
    return rows


def _report(record: dict) -> str:
    result = record["result"]
    models = result["models"]
    parts = [table_html(_model_rows(models))]
    with_density = {n: r["density"] for n, r in models.items() if "density" in r}
    if with_density:
        fig, ax = new_figure(6.5, 3.6)
        for name, dens in with_density.items():
            values = [max(v, 1e-8 * max(dens["density"])) for v in dens["density"]]
            ax.semilogy(dens["grid"], values, label=f"model {name}")
        ax.set_xlabel("Hessian eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.legend()
        runs, steps = result["options"]["runs"], result["options"]["steps"]
        parts.append(figure_html(fig, caption=f"Hessian eigenvalue density by stochastic Lanczos "
                                              f"quadrature ({runs} runs × {steps} steps, "
                                              "Gaussian broadening)."))
    if all("overlap" in r for r in models.values()) and models:
        fig, ax = new_figure(5, 3.2)
        for name, res in models.items():
            cumulative, total = [], 0.0
            for value in res["overlap"]["per_direction"]:
                total += value
                cumulative.append(total)
            ax.plot(range(1, len(cumulative) + 1), cumulative, "o-", ms=3, label=f"model {name}")
        ax.set_xlabel("top-k Hessian eigenvectors")
        ax.set_ylabel("fraction of ‖∇L‖²")
        ax.set_ylim(0, 1.02)
        ax.legend()
        parts.append(figure_html(fig, caption="Gradient in the top Hessian eigenspace "
                                              "(Gur-Ari et al. 2018)."))
    parts.append("<h3>Cost</h3>" + table_html(_cost_rows(models)))
    notes = sorted({note for r in models.values() for note in r.get("notes", [])})
    if notes:
        parts.append("<p>" + "<br>".join(notes) + "</p>")
    return "".join(parts)


@register_measurement("curvature", options=CurvatureOptions, report=_report, summary=_summary,
                      description="Hessian top-k, trace, density, sharpness, gradient overlap.")
def run_curvature(ctx, options: CurvatureOptions) -> dict:
    """Curvature of each trained model on the first ``subset`` training examples."""
    train = ctx.dataset("train")
    data = train.subset(options.subset) if options.subset else train
    models = {}
    for name in options.models:
        models[name] = _measure_model(ctx.model(name), data, options, ctx.seed, ctx.progress)
    return {"options": options.model_dump(), "models": models}
