"""The ``ridgeline`` command line (typer).

Core commands live here; each instrument adds its own from ``ridgeline/<instrument>/cli.py``
through a ``register(app)`` function.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import typer

from ridgeline._version import __version__
from ridgeline.errors import RidgelineError

app = typer.Typer(name="ridgeline", add_completion=False, no_args_is_help=True,
                  help="Measure the geometry of neural-network training.")

INSTRUMENTS = ("connectivity", "curvature", "kernels", "transport", "gradients", "subspace",
               "merge", "sweep")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ridgeline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads."),
) -> None:
    if quiet:
        os.environ["RIDGELINE_QUIET"] = "1"
    if threads:
        import torch

        torch.set_num_threads(threads)


def progress_on() -> bool:
    return os.environ.get("RIDGELINE_QUIET") != "1"


def fail(error: Exception) -> None:
    """Print a ridgeline error without a traceback and exit with status 2."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def study(
    config: Path | None = typer.Argument(None, help="Study TOML (default: the built-in study)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<name>)."),
    preset: str | None = typer.Option(None, "--preset", help="A preset of the config: quick or full."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip writing report.html."),
) -> None:
    """Run (or resume) a study and write results.jsonl, checkpoints and report.html."""
    from ridgeline import distributed
    from ridgeline.study import load_config, run_study

    try:
        distributed.init_from_environment()
        cfg = load_config(config, preset=preset)
        text = None if preset else (config.read_text() if config else None)
        outcome = run_study(cfg, out, progress=progress_on(), report=not no_report, config_text=text)
    except RidgelineError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished measurements are kept in results.jsonl; run the same "
                    "command again to resume.", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    if distributed.is_main_process():
        typer.echo(f"ran {len(outcome.ran)} measurements, {len(outcome.skipped)} already done")
        typer.echo(f"results: {outcome.run_dir / 'results.jsonl'}")
        if outcome.report:
            typer.echo(f"report:  {outcome.report.resolve()}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A study's run directory.")) -> None:
    """Regenerate report.html from a run's results.jsonl."""
    from ridgeline.study import write_report

    if not (run_dir / "results.jsonl").exists():
        fail(FileNotFoundError(f"{run_dir / 'results.jsonl'} does not exist; run a study first."))
    typer.echo(f"report: {write_report(run_dir).resolve()}")


def load_data(name: str, split: str = "train", subset: int | None = None):
    """A built-in dataset by name, or an ``.npz`` with arrays ``x`` and ``y``."""
    import numpy as np
    import torch

    from ridgeline.data import Dataset, load_dataset

    if name.endswith(".npz"):
        with np.load(name, allow_pickle=False) as archive:
            x, y = torch.from_numpy(archive["x"]), torch.from_numpy(archive["y"])
        data = Dataset(x.float(), y if y.is_floating_point() else y.long(),
                       int(y.max()) + 1 if not y.is_floating_point() else None, Path(name).stem)
    else:
        data = load_dataset(name, split)
    return data.subset(subset) if subset else data


def reference_model_arguments(model: str, widths: list[int], data) -> dict:
    """Arguments of a reference model (mlp, cnn1d, resnet) sized for a dataset: input
    features or channels from the inputs, outputs from the classes (or regression width)."""
    if data.num_classes is not None:
        outputs = data.num_classes
    elif data.targets.is_floating_point():
        outputs = int(data.targets.shape[-1]) if data.targets.dim() > 1 else 1
    else:
        outputs = int(data.targets.max()) + 1
    if model == "mlp":
        return {"in_features": int(data.inputs[0].numel()), "widths": widths,
                "out_features": outputs}
    kwargs = {"out_features": outputs, ("channels" if model == "cnn1d" else "widths"): widths}
    if data.inputs.dim() == 4:
        kwargs.update(in_channels=int(data.inputs.shape[1]), dims=2)
    return kwargs


@app.command("train")
def train_command(
    out: Path = typer.Option(..., "--out", help="Checkpoint path (.safetensors)."),
    model: str = typer.Option("mlp", "--model", help="mlp, cnn1d or resnet."),
    data: str = typer.Option("mnist1d", "--data", help="mnist1d, digits, or an .npz with x, y."),
    widths: str = typer.Option("256,256", "--widths", help="Hidden widths (mlp) or channels."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd, adam, adamw, sam, asam, saf, mesa."),
    lr: float = typer.Option(0.05, "--lr"),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(128, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="Init and data-order seed."),
    option: list[str] = typer.Option([], "--option", help="Method option KEY=VALUE (e.g. rho=0.1)."),
) -> None:
    """Train a reference model on a built-in dataset and save a checkpoint."""
    import torch

    from ridgeline.models import build_model
    from ridgeline.train import save, train

    try:
        train_data, test_data = load_data(data, "train"), load_data(data, "test")
        kwargs = reference_model_arguments(model, [int(w) for w in widths.split(",") if w],
                                           train_data)
        torch.manual_seed(seed)
        net = build_model(model, **kwargs)
        options = {}
        for item in option:
            key, _, value = item.partition("=")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value  # a plain string such as float16 or local
        result = train(net, train_data, optimizer=optimizer, lr=lr, momentum=momentum,
                       weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, seed=seed,
                       eval_data=test_data, progress=progress_on(), **options)
        save(net, out, metadata={"data": data, "train": result.config})
    except RidgelineError as exc:
        fail(exc)
    final = result.final
    typer.echo(f"saved {out}: train loss {final['train_loss']:.4f}, test accuracy "
               f"{final.get('eval_accuracy') or float('nan'):.4f}, "
               f"{1000 * result.time_per_step:.2f} ms/step")


def _register_instruments() -> None:
    for name in INSTRUMENTS:
        module = f"ridgeline.{name}.cli"
        if importlib.util.find_spec(f"ridgeline.{name}") is None:
            continue
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(app)


_register_instruments()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
