"""``ridgeline curvature CKPT``: Hessian spectrum, trace, density and sharpness of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from ridgeline.cli_options import data_args_option, data_option, model_args_option, model_option


def register(app: typer.Typer) -> None:
    @app.command("curvature")
    def curvature_command(
        checkpoint: Path = typer.Argument(..., help="A checkpoint: .safetensors, a .pt/.pth/.bin "
                                          "state_dict, or a Hugging Face model folder."),
        model: str | None = model_option(),
        model_args: str | None = model_args_option(),
        data: str = data_option(),
        data_args: str | None = data_args_option(),
        split: str = typer.Option("train", "--split", help="train or test."),
        subset: int | None = typer.Option(None, "--subset", help="Use the first N examples."),
        loss: str = typer.Option("cross_entropy", "--loss", help="cross_entropy or mse."),
        k: int = typer.Option(5, "--k", help="Number of top Hessian eigenvalues."),
        tol: float = typer.Option(1e-3, "--tol", help="Relative residual tolerance (Lanczos)."),
        smallest: bool = typer.Option(False, "--smallest", help="Also the most negative eigenvalue."),
        with_trace: bool = typer.Option(False, "--trace", help="Hutchinson trace estimate."),
        rtol: float = typer.Option(0.05, "--rtol", help="Relative standard error of the trace."),
        with_density: bool = typer.Option(False, "--density", help="SLQ spectral density."),
        runs: int = typer.Option(10, "--runs", help="SLQ runs (random start vectors)."),
        steps: int = typer.Option(80, "--steps", help="Lanczos steps per SLQ run."),
        plot: Path | None = typer.Option(None, "--plot", help="Save the density plot here."),
        with_sharpness: bool = typer.Option(False, "--sharpness",
                                            help="Adaptive worst-case ℓ∞ and average ℓ2 sharpness."),
        rho_worst: float = typer.Option(0.002, "--rho-worst"),
        rho_average: float = typer.Option(0.1, "--rho-average"),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Top-k Hessian eigenvalues (and optionally trace, density, sharpness) of a model."""
        from rich.console import Console
        from rich.table import Table

        from ridgeline import Objective
        from ridgeline.cli_options import (
            check_plot_path,
            check_subset,
            fail,
            load_data,
            load_model,
            parse_json_object,
            progress_on,
        )
        from ridgeline.curvature import (
            CurvatureOperator,
            density,
            sharpness,
            top_eigenvalues,
            trace,
        )
        from ridgeline.errors import ConfigError, RidgelineError

        show = progress_on()
        rows: list[tuple[str, str, str]] = []
        try:
            check_subset(subset)
            check_plot_path(plot)
            if plot is not None and not with_density:
                raise ConfigError("--plot saves the spectral density; add --density.")
            if k < 1:
                raise ConfigError(f"--k must be ≥ 1, got {k}.")
            data_kwargs = parse_json_object(data_args, "--data-args")
            net = load_model(checkpoint, model, model_args)
            dataset = load_data(data, split, subset, data_kwargs)
            objective = Objective(net, dataset, loss)
            operator = CurvatureOperator(objective, "hessian")
            top = top_eigenvalues(operator, k=k, tol=tol, seed=seed, progress=show)
            for i, (value, rel) in enumerate(zip(top.values.tolist(),
                                                 top.relative_residuals.tolist()), 1):
                rows.append((f"λ{i}", f"{value:.6g}", f"rel. residual {rel:.1e}"))
            rows.append(("top-k HVPs", str(top.matvecs), "converged" if top.converged
                         else "NOT converged"))
            if smallest:
                low = top_eigenvalues(operator, k=1, which="smallest", tol=tol, seed=seed,
                                      progress=show)
                rows.append(("λ_min", f"{low.values[0]:.6g}",
                             f"rel. residual {low.relative_residuals[0]:.1e}, "
                             f"{low.matvecs} HVPs"))
            if with_trace:
                result = trace(operator, method="hutchinson", rtol=rtol, seed=seed,
                               block_size=4, progress=show)
                rows.append(("trace", f"{result.value:.6g}",
                             f"± {result.stderr:.3g} (std. error), {result.matvecs} HVPs"))
            if with_density:
                result = density(operator, runs=runs, steps=steps, seed=seed, progress=show)
                moments = result.moments
                rows.append(("density: tr(H)/P", f"{moments[1]:.4g}",
                             f"tr(H²)/P = {moments[2]:.4g}, {result.matvecs} HVPs"))
                if plot is not None:
                    import matplotlib

                    matplotlib.use("Agg")
                    ax = result.plot()
                    ax.figure.savefig(plot, bbox_inches="tight")
                    rows.append(("density plot", str(plot), ""))
            if with_sharpness:
                worst = sharpness(objective, kind="worst", rho=rho_worst, norm="inf", seed=seed,
                                  progress=show)
                average = sharpness(objective, kind="average", rho=rho_average, norm=2,
                                    seed=seed, progress=show)
                rows.append(("worst-case sharpness", f"{worst.value:.4g}",
                             f"adaptive ℓ∞, ρ={rho_worst:g}, {worst.evaluations} gradients"))
                rows.append(("average sharpness", f"{average.value:.4g}",
                             f"± {average.stderr:.2g}, adaptive ℓ2, ρ={rho_average:g}"))
        except RidgelineError as exc:
            fail(exc)
        table = Table(title=f"curvature of {checkpoint.name} on {data} ({split}, "
                            f"{objective.num_examples} examples, {operator.shape[0]:,} parameters)")
        for column in ("quantity", "value", "detail"):
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        for note in operator.notes:
            typer.echo(f"note: {note}")
