"""Measurement ``slice``: a 1-D or 2-D slice of the loss landscape around a model."""

from __future__ import annotations

import math
from typing import Literal

from ridgeline.study.figures import figure_html, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement


class SliceOptions(Options):
    model: str = "a"
    directions: Literal["filter", "hessian", "models"] = "filter"  # "filter", "hessian" or "models" (toward `others`)
    others: list[str] = []
    dims: int = 2
    span: float = 1.0
    points: int = 21
    split: str = "train"
    subset: int | None = 1000


def _finite(values) -> list[float]:
    flat = values if not values or not isinstance(values[0], list) else [v for r in values for v in r]
    return [v for v in flat if v is not None and math.isfinite(v)]


def _summary(record: dict) -> dict:
    result = record["result"]
    finite = _finite(result["losses"])
    return {"model": record["options"]["model"], "directions": result["directions"],
            "dims": result["dims"], "points": len(result["x"]) ** result["dims"],
            "center loss": result["center_loss"], "min loss": min(finite) if finite else None,
            "max loss": max(finite) if finite else None}


def _report(record: dict) -> str:
    from ridgeline.connectivity.slices import SliceResult

    result = record["result"]

    def floats(values):
        if result["dims"] == 2:
            return tuple(tuple(float("nan") if v is None else v for v in row) for row in values)
        return tuple(float("nan") if v is None else v for v in values)

    trajectory = result.get("trajectory")
    view = SliceResult(result["dims"], tuple(result["x"]),
                       None if result["y"] is None else tuple(result["y"]),
                       floats(result["losses"]), None, result["directions"],
                       tuple(result["direction_norms"]), result["center_loss"],
                       None if trajectory is None else tuple(map(tuple, trajectory)))
    fig, ax = new_figure(5.6, 4.4) if result["dims"] == 2 else new_figure(5.6, 3.4)
    view.plot(ax)
    caption = (f"Loss on a {result['dims']}-D slice around model {record['options']['model']} "
               f"({result['directions']} directions; the star is the model).")
    return figure_html(fig, caption=caption) + table_html([_summary(record)])


def _check(config, options: SliceOptions) -> list[str]:
    if options.directions == "models" and not options.others:
        return ["directions = 'models' needs others = [model names] (one or two)"]
    if options.directions == "models" and len(options.others) > 2:
        return [f"a slice has at most two directions; others = {options.others}"]
    return []


@register_measurement("slice", options=SliceOptions, report=_report, summary=_summary,
                      check=_check,
                      description="A 1-D/2-D slice of the loss landscape around a model.")
def run_slice(ctx, options: SliceOptions) -> dict:
    """Evaluate θ + x d1 + y d2 on a grid (filter-normalised, Hessian or model directions)."""
    from ridgeline.connectivity import slice as landscape_slice
    from ridgeline.connectivity.paths import _batchnorms
    from ridgeline.errors import ConfigError

    model = ctx.model(options.model)
    data = ctx.dataset(options.split)
    if options.subset:
        data = data.subset(options.subset)
    if options.directions == "models":
        if not options.others:
            raise ConfigError("slice with directions='models' needs others = [model names].")
        directions = tuple(ctx.model(name) for name in options.others)
    elif options.directions in ("filter", "hessian"):
        directions = options.directions
    else:
        raise ConfigError(f"slice directions must be 'filter', 'hessian' or 'models', got "
                          f"{options.directions!r}.")
    reset = ctx.dataset("train") if _batchnorms(model) else None
    result = landscape_slice(model, data, directions=directions, dims=options.dims,
                             span=options.span, points=options.points, seed=ctx.seed,
                             reset_bn=reset, progress=ctx.progress)
    return result.to_dict()
