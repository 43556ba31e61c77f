"""``ridgeline connect A.safetensors B.safetensors --data mnist1d``: barriers as a table."""

from __future__ import annotations

from pathlib import Path

import typer

from ridgeline.cli_options import (
    data_args_option,
    data_option,
    model_args_option,
    model_option,
    restarts_option,
)


def register(app: typer.Typer) -> None:
    @app.command("connect")
    def connect(
        model_a: Path = typer.Argument(..., help="Checkpoint of model A (.safetensors, .pt/.pth/"
                                       ".bin state_dict, or a Hugging Face model folder)."),
        model_b: Path = typer.Argument(..., help="Checkpoint of model B (same architecture)."),
        model: str | None = model_option(help="The model both checkpoints' tensors belong to: "
                                              "your factory MODULE:CALLABLE (or mlp, cnn1d, "
                                              "resnet); needed for files without a sidecar."),
        model_args: str | None = model_args_option(),
        data: str = data_option(),
        data_args: str | None = data_args_option(),
        split: str = typer.Option("train", "--split", help="Data split for the path: train or test."),
        subset: int | None = typer.Option(None, "--subset", help="Use only the first N examples."),
        align_method: str | None = typer.Option(
            None, "--align", help="Also align B to A first: weights or activations."),
        points: int = typer.Option(25, "--points", help="Points on the α grid (both ends)."),
        reset_bn: bool = typer.Option(True, "--reset-bn/--no-reset-bn",
                                      help="Re-estimate BatchNorm statistics at every point."),
        plot: Path | None = typer.Option(None, "--plot", help="Save the loss curves to this image."),
        seed: int = typer.Option(0, "--seed", help="Seed of the weight-matching order."),
        restarts: int | None = restarts_option(),
    ) -> None:
        """Loss barrier on the straight line between two checkpoints, naive and aligned."""
        from rich.console import Console
        from rich.table import Table

        from ridgeline.cli_options import (
            check_plot_path,
            check_restarts,
            check_subset,
            fail,
            load_data,
            load_model,
            parse_json_object,
            progress_on,
        )
        from ridgeline.errors import ConfigError, RidgelineError

        from . import align, interpolate
        from .paths import _batchnorms

        try:
            if align_method not in (None, "weights", "activations"):
                raise ConfigError(f"--align must be 'weights' or 'activations', got {align_method!r}.")
            if points < 2:
                raise ConfigError(f"--points must be ≥ 2 (both ends), got {points}.")
            check_restarts(restarts, align_method)
            check_subset(subset)
            check_plot_path(plot)
            data_kwargs = parse_json_object(data_args, "--data-args")
            a = load_model(model_a, model, model_args)
            b = load_model(model_b, model, model_args)
            dataset = load_data(data, split, subset, data_kwargs)
            train_data = (load_data(data, "train", subset, data_kwargs) if split != "train"
                          else dataset)
            reset = train_data if reset_bn and _batchnorms(a) else None
            paths = [interpolate(a, b, dataset, points=points, reset_bn=reset,
                                 progress=progress_on(), label="naive")]
            aligned = None
            if align_method:
                aligned = align(a, b, method=align_method, data=train_data, seed=seed,
                                restarts=restarts)
                paths.append(interpolate(a, aligned.model, dataset, points=points, reset_bn=reset,
                                         progress=progress_on(), label=f"aligned ({align_method})"))
        except RidgelineError as exc:
            fail(exc)
            return
        table = Table(title=f"barriers on {data} ({split}, {points} points)")
        table.add_column("path", no_wrap=True)
        for column in ("L(A)", "L(B)", "barrier", "B (mid)", "error B", "α*"):
            table.add_column(column, no_wrap=True)

        def fmt(value: float | None) -> str:
            return "—" if value is None else f"{value:.4g}"

        for path in paths:
            table.add_row(path.label, fmt(path.losses[0]), fmt(path.losses[-1]), fmt(path.barrier),
                          fmt(path.barrier_midpoint_convention), fmt(path.error_barrier),
                          fmt(path.argmax_alpha))
        Console().print(table)
        typer.echo("barrier: max_α L(α) − linear interpolation of the ends (Frankle et al.); "
                   "B (mid): max_α L(α) − mean of the ends (Git Re-Basin's code).")
        if paths[0].normalization != "none":
            typer.echo(f"normalisation at every point: {paths[0].normalization}")
        if aligned is not None:
            runs = ""
            if align_method == "weights":
                from .heads import default_restarts

                used = restarts if restarts is not None else default_restarts(aligned.spec)
                runs = f" (the best of up to {used} runs)" if used > 1 else " (one run)"
            typer.echo(f"alignment: {aligned.iterations} passes{runs}, {aligned.changed_units} "
                       f"units moved, {aligned.seconds:.2f} s")
            if aligned.function_error is not None:
                typer.echo(f"aligned B computes B's function: max |f_B(x) − f_πB(x)| = "
                           f"{aligned.function_error:.3g} (max |f_B(x)| = "
                           f"{aligned.function_scale:.3g}) on the example batch")
        if len(paths) == 2 and paths[0].barrier > 0:
            typer.echo(f"alignment removes {100 * (1 - paths[1].barrier / paths[0].barrier):.1f} % "
                       "of the barrier")
        if plot is not None:
            from ridgeline.plotting import new_figure

            fig, ax = new_figure(5.5, 3.6)
            for path in paths:
                path.plot(ax)
            fig.tight_layout()
            fig.savefig(plot)
            typer.echo(f"plot: {plot}")
