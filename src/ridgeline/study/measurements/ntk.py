"""Measurement ``ntk``: the empirical NTK of each listed model at initialisation and after
training (spectrum, kernel-target alignment, drift), and kernel regression with it
compared with the trained network (METHODS.md §4)."""

from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import Field

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement


class NTKOptions(Options):
    models: list[str] = ["a", "b"]
    n: int = Field(1000, ge=2)
    trace: Literal["sum", "mean"] = "sum"
    regression: bool = True
    regression_model: str | None = None
    regression_n: int = Field(2000, ge=2)
    test_n: int = Field(1000, ge=1)
    memory_budget: str | None = None


def _width(args: dict) -> float | None:
    for key in ("widths", "channels"):
        if isinstance(args.get(key), (list, tuple)) and args[key]:
            return float(max(args[key]))
    return None


def _kernel_facts(kernel, labels) -> dict:
    from ridgeline.kernels import alignment, spectrum

    result = spectrum(kernel)
    return {"eigenvalues": result.values.tolist(), "condition_number": result.condition_number,
            "effective_rank": result.effective_rank, "trace": result.trace,
            "alignment": alignment(kernel, labels),
            "centered_alignment": alignment(kernel, labels, centered=True)}


def _regression(model, train, test, options: NTKOptions, progress: bool) -> dict:
    """Kernel regression f(x*) = Θ(x*, X) Θ⁻¹ Y (one-hot Y, per-output kernel), i.e. the
    infinite-time prediction of gradient flow on MSE from f_0 = 0."""
    import torch

    from ridgeline.kernels import empirical_ntk, predict_gd

    x = torch.cat([train.inputs, test.inputs])
    n = len(train)
    joint = empirical_ntk(model, x, trace="mean", memory_budget=options.memory_budget,
                          progress=progress)
    train_pred, test_pred = predict_gd(joint[:n, :n], train.targets, lr=1.0, t=math.inf,
                                       trace="mean", k_test_train=joint[n:, :n])
    classes = train_pred.shape[1]
    y_test = torch.nn.functional.one_hot(test.targets, classes).to(test_pred.dtype)
    y_train = torch.nn.functional.one_hot(train.targets, classes).to(train_pred.dtype)
    return {"test_accuracy": float((test_pred.argmax(1) == test.targets).float().mean()),
            "test_mse": float(0.5 * (test_pred - y_test).pow(2).sum(1).mean()),
            "train_mse": float(0.5 * (train_pred - y_train).pow(2).sum(1).mean())}


def _network_scores(model, test) -> dict:
    import torch

    with torch.no_grad():
        out = model(test.inputs)
    y = torch.nn.functional.one_hot(test.targets, out.shape[1]).to(out.dtype)
    return {"test_accuracy": float((out.argmax(1) == test.targets).float().mean()),
            "test_mse": float(0.5 * (out - y).pow(2).sum(1).mean()),
            "test_cross_entropy": float(torch.nn.functional.cross_entropy(out, test.targets))}


# ----------------------------------------------------------------------------- report
def _summary(record: dict) -> dict:
    result = record["result"]
    row: dict = {"examples": result["n"]}
    for name, entry in result["models"].items():
        row[f"drift {name}"] = entry["drift"]
        row[f"κ trained {name}"] = entry["trained"]["condition_number"]
        row[f"alignment trained {name}"] = entry["trained"]["centered_alignment"]
    if "regression" in result:
        reg = result["regression"]
        row["kernel regr. acc (init NTK)"] = reg["init_kernel"]["test_accuracy"]
        row["kernel regr. acc (trained NTK)"] = reg["trained_kernel"]["test_accuracy"]
        row["network acc"] = reg["network"]["test_accuracy"]
    return row


def _spectrum_figure(result: dict) -> str:
    fig, ax = new_figure(6.5, 3.8)
    for index, (name, entry) in enumerate(result["models"].items()):
        color = f"C{index}"
        for stage, style in (("init", "--"), ("trained", "-")):
            values = [v for v in entry[stage]["eigenvalues"] if v is not None and v > 0]
            ax.loglog(range(1, len(values) + 1), values, style, color=color,
                      label=f"{name} ({stage})")
    ax.set_xlabel("rank i")
    ax.set_ylabel(f"eigenvalue λ_i of Θ (trace {result['trace']})")
    ax.legend(fontsize=8)
    return figure_html(fig, caption=f"Eigen-spectrum of the empirical NTK on {result['n']} "
                                    "training examples, at initialisation (dashed) and after "
                                    "training (solid).")


def _drift_figure(result: dict) -> str:
    points = sorted((e["width"], e["drift"], name) for name, e in result["models"].items()
                    if e.get("width") and e.get("drift") is not None)
    if len({w for w, _, _ in points}) < 2:
        return ""
    fig, ax = new_figure(5.5, 3.6)
    ax.loglog([p[0] for p in points], [p[1] for p in points], "o-")
    for width, value, name in points:
        ax.annotate(name, (width, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("width")
    ax.set_ylabel("kernel drift 1 − ⟨Θ₀, Θ_T⟩/‖Θ₀‖‖Θ_T‖")
    return figure_html(fig, caption="Kernel drift during training against width: wider networks "
                                    "move their NTK less (the lazy regime).")


def _report(record: dict) -> str:
    result = record["result"]
    rows = []
    for name, entry in result["models"].items():
        rows.append({"model": name, "width": entry.get("width"), "parameters": entry["parameters"],
                     "λ1 init": entry["init"]["eigenvalues"][0],
                     "λ1 trained": entry["trained"]["eigenvalues"][0],
                     "κ init": entry["init"]["condition_number"],
                     "κ trained": entry["trained"]["condition_number"],
                     "alignment init": entry["init"]["centered_alignment"],
                     "alignment trained": entry["trained"]["centered_alignment"],
                     "drift": entry["drift"], "‖ΔΘ‖/‖Θ₀‖": entry["relative_change"],
                     "seconds": entry["seconds"]})
    parts = [_spectrum_figure(result), table_html(rows),
             "<p>κ: condition number λ1/λ_N; alignment: centred kernel-target alignment with "
             "one-hot labels (Cortes et al. 2012); drift: 1 − cosine between the NTKs at "
             "initialisation and after training.</p>", _drift_figure(result)]
    if "regression" in result:
        reg = result["regression"]
        parts.append(
            f"<h3>Kernel regression vs the trained network (model {reg['model']})</h3>"
            f"<p>Θ(x*, X) Θ⁻¹ Y with the per-output NTK on {fmt(reg['n_train'])} training "
            f"examples (the t → ∞ limit of gradient flow on MSE from f₀ = 0), evaluated on "
            f"{fmt(reg['n_test'])} test examples.</p>" + table_html([
                {"predictor": "NTK regression (init kernel)", **reg["init_kernel"]},
                {"predictor": "NTK regression (trained kernel)", **reg["trained_kernel"]},
                {"predictor": "trained network", **reg["network"]}]))
    return "".join(parts)


# ----------------------------------------------------------------------------- run
@register_measurement("ntk", options=NTKOptions, report=_report, summary=_summary,
                      description="Empirical NTK at init and after training: spectrum, "
                                  "alignment, drift; kernel regression vs the network.")
def run_ntk(ctx, options: NTKOptions) -> dict:
    """Empirical NTK of each model on ``n`` training examples, at init and trained."""
    from ridgeline.kernels import drift, empirical_ntk, relative_error

    train, test = ctx.dataset("train"), ctx.dataset("test")
    data = train.subset(options.n)
    result: dict = {"n": len(data), "trace": options.trace, "models": {}}
    for name in options.models:
        began = time.perf_counter()
        kernels, entry = {}, {"width": _width(ctx.config.model(name).args)}
        for stage, model in (("init", ctx.initial_model(name)), ("trained", ctx.model(name).eval())):
            kernels[stage] = empirical_ntk(model, data.inputs, trace=options.trace,
                                           memory_budget=options.memory_budget,
                                           progress=ctx.progress)
            entry[stage] = _kernel_facts(kernels[stage], data.targets)
            entry["parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        entry["drift"] = drift(kernels["init"], kernels["trained"])
        entry["relative_change"] = relative_error(kernels["trained"], kernels["init"])
        entry["seconds"] = time.perf_counter() - began
        result["models"][name] = entry
    if options.regression and options.models:
        name = options.regression_model or options.models[0]
        began = time.perf_counter()
        reg_train, reg_test = train.subset(options.regression_n), test.subset(options.test_n)
        trained = ctx.model(name).eval()
        result["regression"] = {
            "model": name, "n_train": len(reg_train), "n_test": len(reg_test),
            "init_kernel": _regression(ctx.initial_model(name), reg_train, reg_test, options,
                                       ctx.progress),
            "trained_kernel": _regression(trained, reg_train, reg_test, options, ctx.progress),
            "network": _network_scores(trained, reg_test),
        }
        result["regression"]["seconds"] = time.perf_counter() - began
    return result
