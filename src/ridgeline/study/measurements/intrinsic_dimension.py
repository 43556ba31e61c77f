"""Measurement ``intrinsic_dimension``: accuracy of training a study model's architecture in
random d-dimensional subspaces from its initialisation, and d_int90 (Li et al. 2018)."""

from __future__ import annotations

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement


class IntrinsicDimensionOptions(Options):
    model: str = "a"
    dims: list[int] = [100, 300, 1000, 3000, 10000]
    epochs: int = 5
    projection: str = "fastfood"
    search: str = "bisect"
    tol: float = 0.25
    seeds: int = 1
    threshold: float = 0.9
    baseline: str | float = "measured"
    optimizer: str = "adam"
    lr: float | list[float] = 3e-2
    baseline_lr: float | list[float] | None = None
    baseline_epochs: int | None = None
    batch_size: int = 128


def _summary(record: dict) -> dict:
    result = record["result"]
    return {"model": record["options"]["model"], "D": result["num_params"],
            "d_int90": result["d_int90"], "baseline": result["baseline"],
            "target": result["target"], "projection": result["projection"],
            "epochs": result["epochs"], "seconds": result["seconds"]}


def _report(record: dict) -> str:
    from ridgeline.subspace.intrinsic import plot_intrinsic

    result = record["result"]
    fig, ax = new_figure(6.0, 3.6)
    plot_intrinsic(result, ax=ax)
    ax.set_title(f"model {record['options']['model']}: accuracy in a random d-dim subspace")
    found = (f"d_int90 = {result['d_int90']}" if result["d_int90"] is not None
             else f"d_int90 not reached (> {result['dims'][-1]})")
    caption = (f"{found} of D = {result['num_params']:,} parameters. Threshold basis: "
               f"{result['basis']}.")
    rows = [{"d": d, result["metric"]: m, "reached": m >= result["target"]}
            for d, m in zip(result["dims"], result["mean_accuracies"])]
    return (figure_html(fig, caption=caption) + table_html(rows)
            + f"<p>Fraction of parameters needed: {fmt(_fraction(result))}.</p>")


def _fraction(result: dict) -> float | None:
    return None if result["d_int90"] is None else result["d_int90"] / result["num_params"]


def _check(config, options: IntrinsicDimensionOptions) -> list[str]:
    from ridgeline.subspace import PROJECTIONS

    problems = []
    if options.projection not in PROJECTIONS:
        problems.append(f"projection: unknown projection {options.projection!r}; the "
                        f"projections are {sorted(PROJECTIONS)}")
    if options.search not in ("grid", "bisect"):
        problems.append(f"search must be 'grid' or 'bisect', got {options.search!r}")
    import importlib

    training = importlib.import_module("ridgeline.train")
    training._load_method_plugins()
    if options.optimizer not in training.TRAINING_METHODS:
        problems.append(f"optimizer: unknown optimizer {options.optimizer!r}; the optimizers "
                        f"are {sorted(training.TRAINING_METHODS)}")
    return problems


@register_measurement("intrinsic_dimension", options=IntrinsicDimensionOptions, report=_report,
                      check=_check,
                      summary=_summary,
                      description="Accuracy vs subspace dimension d and d_int90 (Li et al. 2018).")
def run_intrinsic_dimension(ctx, options: IntrinsicDimensionOptions) -> dict:
    """Train model ``options.model``'s initialisation in random subspaces; find d_int90."""
    from ridgeline.subspace import intrinsic_dimension

    result = intrinsic_dimension(
        ctx.initial_model(options.model), ctx.dataset("train"), dims=options.dims,
        threshold=options.threshold, baseline=options.baseline, epochs=options.epochs,
        seeds=options.seeds, search=options.search, eval_data=ctx.dataset("test"),
        projection=options.projection, optimizer=options.optimizer, lr=options.lr,
        baseline_lr=options.baseline_lr, baseline_epochs=options.baseline_epochs,
        batch_size=options.batch_size, tol=options.tol,
        seed=ctx.seed, progress=ctx.progress)
    return {**result.to_dict(), "fraction_of_parameters": _fraction(result.to_dict())}
