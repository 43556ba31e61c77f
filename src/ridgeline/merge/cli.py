"""``ridgeline merge A B [C ...] --method fisher --align weights --data mnist1d --out m.safetensors``."""

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
    @app.command("merge")
    def merge_command(
        checkpoints: list[Path] = typer.Argument(..., help="Checkpoints to merge (.safetensors, "
                                                      ".pt/.pth/.bin state_dict, or Hugging "
                                                      "Face folders), one architecture."),
        out: Path | None = typer.Option(None, "--out", help="Write the merged model here "
                                                           "(.safetensors)."),
        method: str = typer.Option("average", "--method",
                                   help="average, fisher, task_arithmetic, ties or dare."),
        align_method: str | None = typer.Option(None, "--align",
                                                help="Align first: weights or activations."),
        base: Path | None = typer.Option(None, "--base", help="Base checkpoint (task_arithmetic, "
                                                             "ties, dare)."),
        weights: str | None = typer.Option(None, "--weights", help="Comma-separated weights, one "
                                                                   "per checkpoint."),
        scale: float = typer.Option(1.0, "--scale", help="λ of the task-vector methods."),
        density: float = typer.Option(0.2, "--density", help="Kept fraction (ties, dare)."),
        fisher: str = typer.Option("exact", "--fisher", help="exact or empirical."),
        model: str | None = model_option(help="The model every checkpoint's tensors belong to: "
                                              "your factory MODULE:CALLABLE (or mlp, cnn1d, "
                                              "resnet); needed for files without a sidecar."),
        model_args: str | None = model_args_option(),
        data: str = data_option(),
        data_args: str | None = data_args_option(),
        subset: int | None = typer.Option(None, "--subset",
                                          help="Use only the first N training examples (Fisher, "
                                               "activations, REPAIR, BatchNorm reset)."),
        reset_bn: bool = typer.Option(True, "--reset-bn/--no-reset-bn",
                                      help="Re-estimate BatchNorm statistics of the merge."),
        repair: bool = typer.Option(False, "--repair",
                                    help="REPAIR the merge's hidden units (no BatchNorm)."),
        predict: bool = typer.Option(False, "--predict",
                                     help="Also print the planner's predicted training loss."),
        seed: int = typer.Option(0, "--seed", help="Weight-matching order and DARE's masks."),
        matching: str = typer.Option("matrices", "--matching",
                                     help="Tensors weight matching compares: matrices (weight "
                                          "matrices and kernels) or all (biases and norm "
                                          "parameters too)."),
        depth_weight: float = typer.Option(1.0, "--depth-weight",
                                           help="Weight matching weighs layer l by "
                                                "depth_weight^(−l) (1: all layers alike)."),
        restarts: int | None = restarts_option(),
    ) -> None:
        """Merge checkpoints; print each model's and the merge's test loss and accuracy."""
        from rich.console import Console
        from rich.table import Table

        from ridgeline.checkpoints import save
        from ridgeline.cli_options import (
            check_output_file,
            check_restarts,
            check_subset,
            fail,
            load_data,
            load_model,
            parse_floats,
            parse_json_object,
        )
        from ridgeline.connectivity.paths import _batchnorms
        from ridgeline.errors import ConfigError, RidgelineError
        from ridgeline.objective import Objective

        from . import merge
        from .core import ALIGNMENTS, METHODS
        from .planner import predicted_merge_loss

        try:
            if len(checkpoints) < 2 and base is None:
                raise ConfigError("give at least two checkpoints to merge (or one and --base).")
            if method not in METHODS:
                raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {method!r}.")
            if align_method not in ALIGNMENTS:
                raise ConfigError(f"--align must be 'weights' or 'activations', got "
                                  f"{align_method!r}.")
            if out is not None and out.suffix != ".safetensors":
                raise ConfigError(f"--out must end in .safetensors, got {out}.")
            check_output_file(out, "--out")
            check_restarts(restarts, align_method)
            check_subset(subset)
            parsed = parse_floats(weights, "--weights") if weights is not None else None
            data_kwargs = parse_json_object(data_args, "--data-args")
            models = [load_model(path, model, model_args) for path in checkpoints]
            base_model = load_model(base, model, model_args) if base is not None else None
            train = load_data(data, "train", subset, data_kwargs)
            test = load_data(data, "test", None, data_kwargs)
            needs_data = method == "fisher" or align_method == "activations" or repair
            result = merge(models, method=method, align=align_method, base=base_model,
                           weights=parsed, data=train if needs_data else None, scale=scale,
                           density=density, fisher=fisher, seed=seed, repair=repair,
                           matching=matching, depth_weight=depth_weight, restarts=restarts,
                           reset_bn=train if reset_bn and _batchnorms(models[0]) else None)
            rows = [(path.name, *Objective(m, test).loss_and_accuracy())
                    for path, m in zip(checkpoints, models)]
            rows.append(("merged", *Objective(result.model, test).loss_and_accuracy()))
            predicted = None
            if predict:
                objective = Objective(result.model, train)
                predicted = predicted_merge_loss(objective, result.endpoints, result.model,
                                                 result.weights)
                measured = objective.loss_and_accuracy()[0]
        except RidgelineError as exc:
            fail(exc)
        title = f"{method}" + (f", aligned by {align_method}" if align_method else "")
        table = Table(title=f"merge ({title}) on {data} test")
        for column in ("model", "test loss", "test accuracy"):
            table.add_column(column, no_wrap=True)
        for name, loss, acc in rows:
            table.add_row(name, f"{loss:.4g}", "—" if acc is None else f"{acc:.4f}")
        Console().print(table)
        if predicted is not None:
            typer.echo(f"planner: predicted training loss {predicted['predicted']:.4g} "
                       f"(mean of the models {predicted['mean_loss']:.4g}, gradient term "
                       f"{predicted['gradient_term']:.4g}, curvature term "
                       f"{predicted['curvature_term']:.4g}); measured {measured:.4g}")
        used = result.details.get("restarts")
        if used is not None:
            runs = "one run" if used == 1 else f"the best of up to {used} runs"
            typer.echo(f"weight matching: {runs} per model")
        for note in result.notes:
            typer.echo(f"note: {note}")
        if out is not None:
            save(result.model, out, metadata={"merge": {k: v for k, v in result.to_dict().items()
                                                        if k != "permutations"},
                                              "inputs": [str(p) for p in checkpoints]})
            typer.echo(f"saved {out}")
