"""Measurement ``merge``: candidate merges of the study's models (methods × alignment),
ranked by the planner's predicted loss and checked against the measured one."""

from __future__ import annotations

import html
import math

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.options import WeightMatchingOptions, restarts_problem
from ridgeline.study.registry import register_measurement


class MergeOptions(WeightMatchingOptions):
    models: list[str] = ["a", "b"]
    methods: list[str] = ["average", "fisher"]
    align: list[str] = ["none", "weights"]  # "none", "weights", "activations"
    base: str | None = None  # a model name, or "init:<name>" for that model's initialisation
    split: str = "train"  # where the loss is predicted and measured
    subset: int | None = 1000  # examples of that split (Fisher, prediction, measurement)
    scale: float = 1.0
    density: float = 0.2
    fisher: str = "exact"
    reset_bn: bool = True


def _summary(record: dict) -> dict:
    result = record["result"]
    candidates = result["candidates"]
    best = max((c for c in candidates if c["eval_accuracy"] is not None),
               key=lambda c: c["eval_accuracy"], default=None)
    ends = [e.get("eval_accuracy") for e in result["endpoints"] if e.get("eval_accuracy") is not None]
    return {"models": ", ".join(record["options"]["models"]), "candidates": len(candidates),
            "endpoint test acc (mean)": sum(ends) / len(ends) if ends else None,
            "best merge": best["label"] if best else None,
            "its test acc": best["eval_accuracy"] if best else None,
            "predicted best": result["best_predicted"], "Spearman": result["spearman"]}


def _report(record: dict) -> str:
    result = record["result"]
    names = result["model_names"]
    candidates = result["candidates"]
    fig, (ax_bar, ax_scatter) = new_figure(11, 4.2, ncols=2)
    labels = [f"model {n}" for n in names] + [c["label"] for c in candidates]
    values = [e.get("eval_accuracy") for e in result["endpoints"]] + [
        c["eval_accuracy"] for c in candidates]
    colors = ["#8c8c8c"] * len(names) + ["#1f77b4"] * len(candidates)
    ax_bar.bar(range(len(labels)), [0 if v is None else v for v in values], color=colors)
    ax_bar.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=7)
    ax_bar.set_ylabel("test accuracy")
    ax_bar.set_title("models (grey) and their merges (blue)")
    points = [(c["predicted"], c["measured"], c["label"]) for c in candidates
              if c["predicted"] is not None and c["measured"] is not None]
    for x, y, label in points:
        ax_scatter.scatter([x], [y], s=24)
        ax_scatter.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    finite = [v for p in points for v in p[:2] if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        ax_scatter.plot([low, high], [low, high], ls="--", lw=0.8, color="grey")
        if low > 0 and high / low > 30:
            ax_scatter.set_xscale("log")
            ax_scatter.set_yscale("log")
    ax_scatter.set_xlabel("predicted loss Σ w_i [L_i + g_i·δ_i + ½ δ_iᵀH_iδ_i]")
    ax_scatter.set_ylabel(f"measured {result['split']} loss of the merge")
    ax_scatter.set_title(f"planner: Spearman {fmt(result['spearman'], 3)}")
    caption = ("Left: test accuracy of the models and of every candidate merge. Right: the "
               "planner's prediction (weighted mean of second-order Taylor expansions around "
               "each model, no evaluation of the merge) against the merge's measured loss.")
    rows = [{"merge": c["label"], "predicted loss": c["predicted"], "measured loss": c["measured"],
             "mean loss of models": c["mean_loss"], "gradient term": c["gradient_term"],
             "curvature term": c["curvature_term"], "spread Σw‖δ‖²": c["spread"],
             "units moved": (sum(c["details"]["units_moved"])
                             if (c.get("details") or {}).get("units_moved") else None),
             "restarts": (c.get("details") or {}).get("restarts"),
             "test acc": c["eval_accuracy"]} for c in candidates]
    lines = [f"predicted best: {result['best_predicted']}; measured best: "
             f"{result['best_measured']}; regret {fmt(result['regret'], 3)}; Kendall "
             f"{fmt(result['kendall'], 3)}"]
    return (figure_html(fig, caption=caption) + table_html(rows)
            + "<p>" + "<br>".join(html.escape(line) for line in lines) + "</p>")


def _check(config, options: MergeOptions) -> list[str]:
    from ridgeline.merge.core import METHODS, TASK_METHODS

    problems = []
    unknown = [m for m in options.methods if m not in METHODS]
    if unknown:
        problems.append(f"methods {unknown} are unknown; choose from {list(METHODS)}")
    bad = [a for a in options.align if a not in ("none", "weights", "activations")]
    if bad:
        problems.append(f"align entries {bad} must be 'none', 'weights' or 'activations'")
    if len(options.models) < 2 and options.base is None:
        problems.append("merge needs at least two models (or one and a base)")
    tasks = [m for m in options.methods if m in TASK_METHODS]
    if tasks and options.base is None:
        problems.append(f"methods {tasks} merge task vectors and need base = a model name or "
                        "'init:<name>' (the model they were fine-tuned from)")
    if options.base is not None:
        name = options.base.removeprefix("init:")
        names = [m.name for m in config.models]
        if name not in names:
            problems.append(f"base {options.base!r} names no study model; models are {names}")
    if not 0 < options.density <= 1:
        problems.append(f"density must lie in (0, 1], got {options.density}")
    if options.fisher not in ("exact", "empirical"):
        problems.append(f"fisher must be 'exact' or 'empirical', got {options.fisher!r}")
    return problems + restarts_problem(options.restarts, "weights" in options.align)


@register_measurement("merge", options=MergeOptions, report=_report, summary=_summary,
                      check=_check,
                      description="Candidate merges (methods × alignment) ranked by "
                                  "predicted loss; measured loss and test accuracy.")
def run_merge(ctx, options: MergeOptions) -> dict:
    """Every candidate merge of the models, predicted by the planner and measured."""
    from ridgeline.connectivity.paths import _batchnorms
    from ridgeline.errors import ConfigError
    from ridgeline.merge import predict_merge

    if len(options.models) < 2 and options.base is None:
        raise ConfigError("merge needs at least two models (or one and a base).")
    bad = [a for a in options.align if a not in ("none", "weights", "activations")]
    if bad:
        raise ConfigError(f"align entries must be 'none', 'weights' or 'activations'; got {bad}.")
    models = [ctx.model(n) for n in options.models]
    base = None
    if options.base is not None:
        name = options.base.removeprefix("init:")
        base = ctx.initial_model(name) if options.base.startswith("init:") else ctx.model(name)
    data = ctx.dataset(options.split)
    if options.subset:
        data = data.subset(options.subset)
    reset = ctx.dataset("train") if options.reset_bn and _batchnorms(models[0]) else None
    align = [None if a == "none" else a for a in options.align]
    plan = predict_merge(models, data, methods=options.methods, align=align, base=base,
                         reset_bn=reset, eval_data=ctx.dataset("test"), scale=options.scale,
                         density=options.density, fisher=options.fisher, seed=ctx.seed,
                         progress=ctx.progress, restarts=options.restarts)
    return {**plan.to_dict(), "model_names": list(options.models), "split": options.split}
