"""``ridgeline intrinsic-dim``: the intrinsic dimension of a reference model on a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ridgeline.cli_options import data_args_option, data_option, model_args_option


def _baseline(text: str):
    from ridgeline.errors import ConfigError

    if text == "measured":
        return text
    try:
        return float(text)
    except ValueError as exc:
        raise ConfigError(f"--baseline must be 'measured' or an accuracy such as 1.0, got {text!r}.") from exc


def _model_fn(model: str, widths: list[int], data, extra: dict | None = None):
    """A zero-argument builder of the model for the data's shape: a reference model sized
    from the data (``extra`` overrides its arguments), or any factory with ``extra``."""
    from ridgeline.cli import model_arguments
    from ridgeline.models import build_model

    kwargs = model_arguments(model, widths, data, dict(extra or {}))
    build_model(model, **kwargs)  # fail fast on bad arguments
    return lambda: build_model(model, **kwargs)


def register(app: typer.Typer) -> None:
    @app.command("intrinsic-dim")
    def intrinsic_dim(
        model: str = typer.Option("mlp", "--model",
                                  help="mlp, cnn1d, resnet, or your own factory MODULE:CALLABLE."),
        model_args: str | None = model_args_option(),
        data: str = data_option(),
        data_args: str | None = data_args_option(),
        widths: str = typer.Option("64,64", "--widths", help="Hidden widths (mlp) or channels."),
        dims: str = typer.Option("10,30,100,300,1000,3000", "--dims",
                                 help="Subspace dimensions to try (the coarse grid)."),
        epochs: int = typer.Option(10, "--epochs", help="Training epochs per run."),
        projection: str = typer.Option("fastfood", "--projection",
                                       help="dense, sparse, fastfood or orthogonal."),
        search: str = typer.Option("grid", "--search", help="grid, or bisect after the grid."),
        seeds: int = typer.Option(1, "--seeds", help="Runs per d (averaged)."),
        threshold: float = typer.Option(0.9, "--threshold", help="Fraction of the baseline to reach."),
        baseline: str = typer.Option("measured", "--baseline",
                                     help="'measured' (train the full model) or an accuracy, e.g. 1.0 "
                                          "for an absolute threshold."),
        optimizer: str = typer.Option("adam", "--optimizer", help="sgd, adam or adamw."),
        lr: str = typer.Option("0.03", "--lr",
                               help="Learning rate(s) of z; with several the best run is kept."),
        baseline_lr: str | None = typer.Option(None, "--baseline-lr",
                                               help="Learning rate(s) of the full model."),
        baseline_epochs: int | None = typer.Option(None, "--baseline-epochs",
                                                   help="Epochs of the full model (default --epochs)."),
        batch_size: int = typer.Option(128, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
        subset: int | None = typer.Option(None, "--subset", help="Use the first N training examples."),
        json_out: Path | None = typer.Option(None, "--json", help="Write the result as JSON here."),
        plot: Path | None = typer.Option(None, "--plot", help="Save accuracy vs d (png/svg/pdf)."),
    ) -> None:
        """Accuracy of training in random d-dimensional subspaces, and d_int90 (Li et al. 2018)."""
        from ridgeline.cli_options import (
            check_output_file,
            check_plot_path,
            check_subset,
            fail,
            load_data,
            parse_floats,
            parse_ints,
            parse_json_object,
            progress_on,
        )
        from ridgeline.errors import RidgelineError
        from ridgeline.subspace.intrinsic import intrinsic_dimension

        try:
            check_subset(subset)
            check_output_file(json_out, "--json")
            check_plot_path(plot)
            sizes, grid = parse_ints(widths, "--widths"), parse_ints(dims, "--dims")
            rates = parse_floats(lr, "--lr")
            base_rates = parse_floats(baseline_lr, "--baseline-lr") if baseline_lr else None
            chosen_baseline = _baseline(baseline)
            extra = parse_json_object(model_args, "--model-args")
            data_kwargs = parse_json_object(data_args, "--data-args")
            train_data = load_data(data, "train", subset, data_kwargs)
            test_data = load_data(data, "test", None, data_kwargs)
            result = intrinsic_dimension(
                _model_fn(model, sizes, train_data, extra), train_data,
                dims=grid, threshold=threshold, baseline=chosen_baseline,
                epochs=epochs, seeds=seeds, search=search, eval_data=test_data,
                projection=projection, optimizer=optimizer, lr=rates, baseline_lr=base_rates,
                baseline_epochs=baseline_epochs,
                batch_size=batch_size, seed=seed, progress=progress_on())
        except RidgelineError as exc:
            fail(exc)
        typer.echo(f"{model} {widths} on {data}: D = {result.num_params} parameters, "
                   f"{projection} projection, {epochs} epochs, {seeds} seed(s)")
        typer.echo(f"{'d':>8}  {result.metric:>14}  reached")
        for d, mean in zip(result.dims, result.mean_accuracies):
            typer.echo(f"{d:>8}  {mean:>14.4f}  {'yes' if mean >= result.target else 'no'}")
        typer.echo(f"baseline ({result.baseline_kind}): {result.baseline:.4f}")
        typer.echo(f"threshold basis: {result.basis}")
        found = result.d_int90 if result.d_int90 is not None else f"not reached (> {result.dims[-1]})"
        typer.echo(f"d_int{round(100 * threshold)} = {found}")
        if json_out is not None:
            json_out.write_text(json.dumps(result.to_dict(), indent=2))
        if plot is not None:
            import matplotlib

            matplotlib.use("Agg")
            ax = result.plot()
            ax.figure.tight_layout()
            ax.figure.savefig(plot)
