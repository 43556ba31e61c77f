"""Measurement ``transport``: sliced Wasserstein between the two models' representations
and between class-conditional point clouds of the data, with MC and control variates."""

from __future__ import annotations

import time

from pydantic import Field

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement


class TransportOptions(Options):
    models: list[str] = Field(["a", "b"], min_length=2, max_length=2)  # the two compared
    layer: str | None = None          # default: the last hidden layer (child before the last)
    split: str = "test"               # inputs whose representations are compared
    classes: list[int] = [0, 1]       # class-conditional clouds of the training inputs
    projections: list[int] = [10, 30, 100, 300, 1000]
    repeats: int = 20
    p: float = 2.0


def _convergences(record: dict):
    from ridgeline.transport import SWConvergence

    result = record["result"]
    return [SWConvergence.from_dict(result[key]) for key in ("features", "classes")
            if result.get(key)]


def _summary(record: dict) -> dict:
    result = record["result"]
    row = {"layer": result["layer"]}
    for key, label in (("features", "features"), ("classes", "classes")):
        if not result.get(key):
            continue
        conv = _convergences({"result": {key: result[key]}})[0]
        best = "lower" if "lower" in conv.estimators else "mc"
        row[f"SW {label}"] = conv.mean[best][-1]
        if "lower" in conv.estimators and 100 in conv.projections:
            row[f"var ÷ lower CV, L=100 ({label})"] = conv.variance_reduction("lower", 100)
    if result.get("features_init"):
        row["SW features at init"] = result["features_init"]["value"]
    return row


def _report(record: dict) -> str:
    result = record["result"]
    convs = _convergences(record)
    fig, axes = new_figure(4.8 * len(convs), 3.6, ncols=len(convs))
    for conv, ax in zip(convs, axes if len(convs) > 1 else [axes]):
        conv.plot(ax)
    caption = (f"SW_{result['p']:g} estimates (mean ± one standard deviation over "
               f"{convs[0].repeats} independent sets of directions) against the number of "
               "projections L, for plain Monte Carlo and the lower/upper Gaussian control "
               "variates (Nguyen & Ho 2024).")
    rows = [row for conv in convs for row in conv.rows()]
    init = result.get("features_init")
    note = ""
    if init:
        note = (f"<p>Representations at layer <code>{fmt(result['layer'])}</code> on "
                f"{result['num_examples']} {fmt(result['split'])} inputs: SW = "
                f"{fmt(_summary(record).get('SW features'))} after training, "
                f"{fmt(init['value'])} ± {fmt(init['stderr'], 2)} at initialisation.</p>")
    return figure_html(fig, caption=caption) + note + table_html(rows)


@register_measurement("transport", options=TransportOptions, report=_report, summary=_summary,
                      description="Sliced Wasserstein between representations and class clouds.")
def run_transport(ctx, options: TransportOptions) -> dict:
    """SW between the two models' hidden representations and between two classes' inputs,
    with error bars against L for Monte Carlo and the lower/upper control variates."""
    from ridgeline.errors import ConfigError, DataError
    from ridgeline.transport import feature_distance, sliced_wasserstein_convergence
    from ridgeline.transport.features import default_layer, representations

    if len(options.models) != 2:
        raise ConfigError(f"transport compares two models; got models={options.models}.")
    if len(options.classes) != 2:
        raise ConfigError(f"transport compares two classes; got classes={options.classes}.")
    began = time.perf_counter()
    name_a, name_b = options.models
    model_a, model_b = ctx.model(name_a), ctx.model(name_b)
    layer = options.layer or default_layer(model_a)
    data = ctx.dataset(options.split)
    estimators = ("mc", "lower", "upper") if options.p == 2 else ("mc",)
    common = dict(projections=options.projections, repeats=options.repeats, p=options.p,
                  estimators=estimators, progress=ctx.progress)
    features = sliced_wasserstein_convergence(
        representations(model_a, data, layer, which=f"model {name_a}"),
        representations(model_b, data, layer, which=f"model {name_b}"),
        seed=ctx.seed, name=f"{name_a} vs {name_b}, layer {layer}", **common)
    init = feature_distance(ctx.initial_model(name_a), ctx.initial_model(name_b), data,
                            layer=layer, projections=max(options.projections), p=options.p,
                            control_variate="lower" if options.p == 2 else None, seed=ctx.seed)
    train = ctx.dataset("train")
    if train.num_classes is None:
        raise DataError("transport's class clouds need a classification dataset; set "
                        "classes only for labelled data.")
    c0, c1 = options.classes
    clouds = [train.class_subset(c).inputs.flatten(1).float() for c in (c0, c1)]
    for c, cloud in zip((c0, c1), clouds):
        if cloud.shape[0] < 2:
            raise DataError(f"class {c} has {cloud.shape[0]} training examples; pick classes "
                            f"in [0, {train.num_classes - 1}] with at least 2 examples.")
    classes = sliced_wasserstein_convergence(*clouds, seed=ctx.seed + 1,
                                             name=f"inputs: class {c0} vs {c1}", **common)
    init_dict = init.to_dict()
    init_dict.pop("per_projection")
    return {"layer": layer, "split": options.split, "num_examples": len(data), "p": options.p,
            "features": features.to_dict(), "features_init": init_dict,
            "classes": classes.to_dict(), "class_sizes": [int(c.shape[0]) for c in clouds],
            "seconds": time.perf_counter() - began}
