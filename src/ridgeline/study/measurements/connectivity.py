"""Measurement ``connectivity``: naive and permutation-aligned linear paths between two
models, their barriers, and layer-wise barriers."""

from __future__ import annotations

import html
from typing import Literal

from pydantic import Field

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.options import WeightMatchingOptions, restarts_problem
from ridgeline.study.registry import register_measurement


class ConnectivityOptions(WeightMatchingOptions):
    models: list[str] = Field(["a", "b"], min_length=2, max_length=2)  # the two compared
    points: int = 25
    splits: list[str] = ["train", "test"]
    align: list[Literal["weights", "activations"]] = ["weights", "activations"]
    layerwise: bool = True
    layerwise_points: int = 11
    reset_bn: bool = True
    subset: int | None = None


def _summary(record: dict) -> dict:
    result = record["result"]
    split = result["splits"][0]
    paths = result["paths"][split]
    row = {"models": " vs ".join(record["options"]["models"]), "split": split,
           "naive barrier": paths["naive"]["barrier"]}
    for label, path in paths.items():
        if label != "naive":
            row[f"{label} barrier"] = path["barrier"]
    best = result.get("reduction")
    if best is not None:
        row["reduction (weights)"] = f"{100 * best:.1f} %"
    return row


def _report(record: dict) -> str:
    result = record["result"]
    parts = []
    fig, axes = new_figure(10, 3.6, ncols=2)
    split = result["splits"][0]
    for label, path in result["paths"][split].items():
        for ax, key, name in ((axes[0], "losses", "loss"), (axes[1], "accuracies", "error")):
            values = path[key]
            if values is None:
                continue
            if name == "error":
                values = [None if v is None else 1 - v for v in values]
            ys = [float("nan") if v is None else v for v in values]
            line, = ax.plot(path["alphas"], ys, marker="o", ms=3,
                            label=f"{label} (B={fmt(path['barrier'] if name == 'loss' else path['error_barrier'], 3)})")
            ax.plot([path["alphas"][0], path["alphas"][-1]], [ys[0], ys[-1]], ls="--", lw=0.7,
                    color=line.get_color())
            ax.set_xlabel("α")
            ax.set_ylabel(f"{split} {name}")
            ax.legend(fontsize=8)
    axes[0].set_title("loss along (1−α)θA + αθB")
    parts.append(figure_html(fig, caption="Naive vs permutation-aligned linear paths; dashed: "
                                          "the straight line between the endpoint values."))
    rows = []
    for split_name, paths in result["paths"].items():
        for label, path in paths.items():
            rows.append({"split": split_name, "path": label, "loss A": path["losses"][0],
                         "loss B": path["losses"][-1], "barrier": path["barrier"],
                         "barrier (midpoint conv.)": path["barrier_midpoint_convention"],
                         "error barrier": path["error_barrier"], "argmax α": path["argmax_alpha"],
                         "normalization": path["normalization"]})
    parts.append(table_html(rows))
    if result.get("alignment"):
        parts.append(table_html([{"method": m, "passes": a["iterations"],
                                  "restarts": a.get("restarts"), "seconds": a["seconds"],
                                  "units moved": a["changed_units"], "converged": a["converged"],
                                  "max |f_B − f_πB|": a.get("function_error")}
                                 for m, a in result["alignment"].items()]))
    layerwise = result.get("layerwise") or {}
    if layerwise:
        fig, (ax, ax_curve) = new_figure(10, 3.6, ncols=2)
        names = next(iter(layerwise.values()))["layers"]
        width = 0.8 / len(layerwise)
        for i, (label, lw) in enumerate(layerwise.items()):
            xs = [j + (i - (len(layerwise) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, [0 if v is None else v for v in lw["barriers"]], width=width, label=label)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        top = max([v for lw in layerwise.values() for v in lw["barriers"] if v is not None] + [0.0])
        ax.set_ylim(0, top * 1.15 if top > 0 else 0.01)
        ax.set_ylabel("barrier (train loss)")
        ax.set_title("layer-wise barriers")
        ax.legend(fontsize=8)
        label, lw = list(layerwise.items())[-1]
        for name, path in zip(lw["layers"], lw["paths"]):
            alphas, losses = path["alphas"], path["losses"]
            if any(v is None for v in losses):
                continue
            excess = [v - ((1 - a) * losses[0] + a * losses[-1]) for a, v in zip(alphas, losses)]
            ax_curve.plot(alphas, excess, marker="o", ms=3, label=f"layer {name}")
        ax_curve.axhline(0, color="grey", lw=0.8, ls="--")
        ax_curve.set_xlabel("α (only layer ℓ moves)")
        ax_curve.set_ylabel("L(α) − linear interpolation")
        ax_curve.set_title(f"layer paths, {label}")
        ax_curve.legend(fontsize=8)
        parts.append(figure_html(fig, caption="Adilova et al. (2024): barrier of the path "
                                              "A → A + Δ_ℓ for each layer ℓ (left) and each "
                                              "path's excess over the straight line (right); "
                                              "a barrier of 0 means the layer's path has no "
                                              "bump."))
    if result.get("notes"):
        parts.append("<p>" + "<br>".join(html.escape(n) for n in result["notes"]) + "</p>")
    return "".join(parts)


def _check(config, options: ConnectivityOptions) -> list[str]:
    return restarts_problem(options.restarts, "weights" in options.align)


@register_measurement("connectivity", options=ConnectivityOptions, report=_report,
                      summary=_summary, check=_check,
                      description="Linear-path barriers between two models, naive and "
                                  "permutation-aligned; layer-wise barriers.")
def run_connectivity(ctx, options: ConnectivityOptions) -> dict:
    """Naive path, aligned paths (weight and activation matching), layer-wise barriers."""
    from ridgeline.connectivity import align, interpolate, layerwise_barriers
    from ridgeline.connectivity.paths import _batchnorms
    from ridgeline.study.options import used_restarts

    name_a, name_b = options.models
    model_a, model_b = ctx.model(name_a), ctx.model(name_b)
    train = ctx.dataset("train")
    if options.subset:
        train = train.subset(options.subset)
    datasets = {"train": train, "test": ctx.dataset("test")}
    reset = train if options.reset_bn and _batchnorms(model_a) else None
    candidates = {"naive": model_b}
    alignment = {}
    for method in options.align:
        aligned = align(model_a, model_b, method=method, data=train, seed=ctx.seed,
                        restarts=options.restarts if method == "weights" else None)
        candidates[f"aligned ({method})"] = aligned.model
        alignment[method] = {k: v for k, v in aligned.to_dict().items() if k != "permutations"}
        if method == "weights":  # the runs as made (the option, or the library's default)
            alignment[method]["restarts"] = used_restarts(options.restarts, aligned.spec)
    paths: dict[str, dict] = {}
    for split in options.splits:
        paths[split] = {label: interpolate(model_a, other, datasets[split], points=options.points,
                                           reset_bn=reset, label=label,
                                           progress=ctx.progress).to_dict()
                        for label, other in candidates.items()}
    layerwise = {}
    if options.layerwise:
        for label in ("naive", "aligned (weights)"):
            if label in candidates:
                layerwise[label] = layerwise_barriers(
                    model_a, candidates[label], train, points=options.layerwise_points,
                    reset_bn=reset, metrics=("loss",), progress=ctx.progress).to_dict()
                for path in layerwise[label]["paths"]:  # keep the record small
                    path.pop("accuracies", None)
    first = paths[options.splits[0]]
    naive = first["naive"]["barrier"]
    reduction = None
    if "aligned (weights)" in first and naive:
        reduction = 1 - first["aligned (weights)"]["barrier"] / naive
    return {"splits": list(options.splits), "paths": paths, "alignment": alignment,
            "layerwise": layerwise, "reduction": reduction,
            "notes": [n for a in alignment.values() for n in a.get("notes", [])]}
