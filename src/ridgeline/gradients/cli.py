"""``ridgeline fwdgrad CKPT --data mnist1d --guess local``: forward-gradient quality."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ridgeline.cli_options import data_args_option, data_option, model_args_option, model_option


def register(app: typer.Typer) -> None:
    @app.command("fwdgrad")
    def fwdgrad(
        checkpoint: Path = typer.Argument(..., help="A checkpoint: .safetensors, a .pt/.pth/.bin "
                                          "state_dict, or a Hugging Face model folder."),
        model: str | None = model_option(),
        model_args: str | None = model_args_option(),
        data: str = data_option(),
        data_args: str | None = data_args_option(),
        split: str = typer.Option("train", "--split", help="Data split: train or test."),
        subset: int | None = typer.Option(None, "--subset", help="Use only the first N examples."),
        guess: str = typer.Option("random", "--guess", help="random, rademacher, local or previous."),
        repeats: int = typer.Option(10, "--repeats", help="Independent estimates (random guesses)."),
        num_guesses: int = typer.Option(1, "--num-guesses", help="Guesses per estimate (K)."),
        combine: str = typer.Option("mean", "--combine", help="mean or span."),
        fit_epochs: int = typer.Option(5, "--fit-epochs", help="Epochs to fit local heads."),
        seed: int = typer.Option(0, "--seed"),
        out: Path | None = typer.Option(None, "--json", help="Also write the result as JSON."),
    ) -> None:
        """Cosine between forward-gradient estimates and the backprop gradient, overall and
        per layer (mean ± std over repeats), next to the random baseline 1/√P."""
        from rich.console import Console
        from rich.table import Table

        from ridgeline.cli_options import (
            check_output_file,
            check_subset,
            fail,
            load_data,
            load_model,
            parse_json_object,
        )
        from ridgeline.errors import RidgelineError

        from .quality import quality

        try:
            check_subset(subset)
            check_output_file(out, "--json")
            data_kwargs = parse_json_object(data_args, "--data-args")
            net = load_model(checkpoint, model, model_args)
            dataset = load_data(data, split, subset, data_kwargs)
            result = quality(net, dataset, guess=guess, repeats=repeats,
                             num_guesses=num_guesses, combine=combine, seed=seed,
                             fit_epochs=fit_epochs)
        except RidgelineError as exc:
            fail(exc)
            return
        summary = result.to_dict()
        console = Console(width=120)
        console.print(f"guess {guess}: cos(ĝ, g) = {summary['mean']:.4g} ± {summary['std']:.2g} "
                      f"over {summary['repeats']} estimate(s); 1/√P = "
                      f"{summary['random_baseline']:.3g} (P = {summary['num_params']:,}), "
                      f"{summary['ratio_to_baseline']:.1f}× the baseline")
        flops = summary["details"].get("flops")
        if flops:
            console.print(f"auxiliary heads: {100 * flops['ratio']:.1f} % of the network's "
                          "multiply-accumulates")
        table = Table(title=f"cosine per layer ({data}, {split})")
        for column in ("layer", "params", "cos mean", "cos std"):
            table.add_column(column)
        for layer, row in summary["per_layer"].items():
            table.add_row(layer, f"{row['size']:,}", f"{row['mean']:.4g}", f"{row['std']:.2g}")
        console.print(table)
        if out is not None:
            out.write_text(json.dumps(summary, indent=2))
