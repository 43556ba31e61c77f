"""``ridgeline ntk CKPT``: empirical NTK spectrum, condition number and alignment of a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ridgeline.cli_options import data_args_option, data_option, model_args_option, model_option


def register(app: typer.Typer) -> None:
    @app.command("ntk")
    def ntk_command(
        checkpoint: Path = typer.Argument(..., help="A checkpoint: .safetensors, a .pt/.pth/.bin "
                                          "state_dict, or a Hugging Face model folder."),
        model: str | None = model_option(),
        model_args: str | None = model_args_option(),
        data: str = data_option(),
        data_args: str | None = data_args_option(),
        split: str = typer.Option("train", "--split", help="train or test."),
        n: int = typer.Option(512, "--n", help="Number of examples (the first n of the split)."),
        trace: str = typer.Option("sum", "--trace", help="sum or mean over the outputs."),
        method: str = typer.Option("auto", "--method", help="auto, jacobian or ntk_vp."),
        memory_budget: str | None = typer.Option(None, "--memory-budget",
                                                 help="e.g. 4GiB (default: half the free memory)."),
        chunk_size: int | None = typer.Option(None, "--chunk-size", help="Examples per tile side."),
        top: int = typer.Option(5, "--top", help="Largest eigenvalues to print."),
        plot: Path | None = typer.Option(None, "--plot", help="Save the eigen-spectrum plot here."),
    ) -> None:
        """Empirical NTK of a model on n examples: eigen-spectrum, condition number, alignment."""
        from rich.console import Console
        from rich.table import Table

        from ridgeline import Objective
        from ridgeline.cli_options import (
            check_plot_path,
            fail,
            load_data,
            load_model,
            parse_json_object,
            progress_on,
        )
        from ridgeline.errors import ConfigError, RidgelineError
        from ridgeline.kernels import alignment, empirical_ntk, plan_ntk, spectrum

        try:
            if trace not in ("sum", "mean"):
                raise ConfigError(f"--trace must be 'sum' or 'mean', got {trace!r}.")
            if n < 1:
                raise ConfigError(f"--n must be positive, got {n}.")
            check_plot_path(plot)
            data_kwargs = parse_json_object(data_args, "--data-args")
            net = load_model(checkpoint, model, model_args).eval()
            dataset = load_data(data, split, n, data_kwargs)
            # the same checks as every other instrument: finite inputs, labels in range
            Objective(net, dataset, "mse" if dataset.targets.is_floating_point()
                      else "cross_entropy")
            first = next(net.parameters())
            inputs = dataset.inputs.to(first.device)
            if inputs.is_floating_point():  # token ids stay integers
                inputs = inputs.to(first.dtype)
            options = dict(trace=trace, method=method, chunk_size=chunk_size,
                           memory_budget=memory_budget)
            plan = plan_ntk(net, inputs, **options)
            began = time.perf_counter()
            kernel = empirical_ntk(net, inputs, progress=progress_on(), **options)
            seconds = time.perf_counter() - began
            result = spectrum(kernel)
            labels = dataset.targets
            # kernel-target alignment needs one label (or target vector) per example; token
            # targets (N, T) of a sequence model have none
            per_example = labels.is_floating_point() or labels.dim() == 1
            aligned = alignment(kernel, labels) if per_example else None
            centred = alignment(kernel, labels, centered=True) if per_example else None
        except RidgelineError as exc:
            fail(exc)
        values = result.values
        table = Table(title=f"empirical NTK of {checkpoint.name} on {len(dataset)} {data} "
                            f"{split} examples (trace={trace})")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_column("note")
        table.add_row("method", plan.method, f"{plan.num_params:,} parameters, "
                      f"{plan.num_outputs} outputs")
        table.add_row("time", f"{seconds:.2f} s", f"tiles of {plan.chunk_size} examples")
        for i in range(min(top, values.numel())):
            table.add_row(f"λ{i + 1}", f"{float(values[i]):.6g}", "")
        table.add_row("λ_min", f"{float(values[-1]):.6g}", "")
        table.add_row("condition number", f"{result.condition_number:.4g}", "λ1 / λ_min")
        table.add_row("effective rank", f"{result.effective_rank:.4g}", "(Σλ)² / Σλ²")
        table.add_row("trace", f"{result.trace:.6g}", "")
        if aligned is None:
            table.add_row("alignment", "—", "needs one label per example (these targets are "
                          f"{tuple(labels.shape[1:])} per example)")
        else:
            table.add_row("alignment", f"{aligned:.4f}", "⟨K, YYᵀ⟩ / ‖K‖‖YYᵀ‖")
            table.add_row("centred alignment", f"{centred:.4f}", "with K ← HKH, H = I − 11ᵀ/N")
        Console().print(table)
        if plot is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            ax = result.plot()
            ax.set_title(f"NTK eigen-spectrum, {checkpoint.name}")
            ax.figure.tight_layout()
            ax.figure.savefig(plot)
            plt.close(ax.figure)
            typer.echo(f"plot: {plot}")
