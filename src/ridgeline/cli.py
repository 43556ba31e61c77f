"""The ``ridgeline`` command line (typer).

Core commands live here; each instrument adds its own from ``ridgeline/<instrument>/cli.py``
through a ``register(app)`` function. Options and checks shared by the commands
(``--model``, ``--model-args``, ``--data``, output paths, :func:`fail`) are in
:mod:`ridgeline.cli_options`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path

import typer
from typer.core import TyperGroup

from ridgeline._version import __version__
from ridgeline.cli_options import (
    check_output_file,
    data_args_option,
    fail,
    load_data,
    parse_ints,
    parse_json_object,
    parse_key_values,
    progress_on,
    warning_line,
)
from ridgeline.errors import ConfigError, RidgelineError

__all__ = ["app", "main", "fail", "load_data", "progress_on", "reference_model_arguments"]

#: flags of the root command that may also follow the subcommand
GLOBAL_FLAGS = ("-q", "--quiet")


class _Group(TyperGroup):
    """The root group: ``-q``/``--quiet`` is accepted after the command too
    (``ridgeline study -q`` as well as ``ridgeline -q study``)."""

    def parse_args(self, ctx, args):
        commands = set(self.list_commands(ctx))
        out, moved, seen_command = [], [], False
        for i, token in enumerate(args):
            if token == "--":
                out += args[i:]
                break
            if seen_command and token in GLOBAL_FLAGS:
                moved.append("--quiet")
                continue
            seen_command = seen_command or token in commands
            out.append(token)
        return super().parse_args(ctx, moved + out)


app = typer.Typer(name="ridgeline", add_completion=False, no_args_is_help=True, cls=_Group,
                  help="Measure the geometry of neural-network training.")

INSTRUMENTS = ("connectivity", "curvature", "kernels", "transport", "gradients", "subspace",
               "merge", "sweep")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ridgeline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress bars (also accepted after the command)."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads."),
) -> None:
    previous_quiet = os.environ.get("RIDGELINE_QUIET")
    if quiet:
        os.environ["RIDGELINE_QUIET"] = "1"
    previous_show = warnings.showwarning
    warnings.showwarning = warning_line  # warnings as one clean line, not source + category

    def restore() -> None:
        warnings.showwarning = previous_show
        if quiet:
            if previous_quiet is None:
                os.environ.pop("RIDGELINE_QUIET", None)
            else:
                os.environ["RIDGELINE_QUIET"] = previous_quiet

    ctx.call_on_close(restore)
    if threads is not None:
        if threads < 1:
            fail(ConfigError(f"--threads must be ≥ 1, got {threads}."))
        import torch

        torch.set_num_threads(threads)


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
    if importlib.util.find_spec("ridgeline.sweep") is not None:
        from ridgeline.sweep import is_sweep, refresh_correlation, write_sweep_report

        if is_sweep(run_dir):  # a sweep: bring its correlation record up to date
            from ridgeline.errors import RunInUseError
            from ridgeline.study.lock import RunLock

            try:
                with RunLock(run_dir):  # the driver is the only writer while it runs
                    refresh_correlation(run_dir)
            except RunInUseError:
                typer.echo("the sweep is still running: report from the records so far, "
                           "correlation record not refreshed")
            typer.echo(f"report: {write_sweep_report(run_dir).resolve()}")
            return
    typer.echo(f"report: {write_report(run_dir).resolve()}")


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


BUILT_IN_MODELS = ("mlp", "cnn1d", "resnet")


def model_arguments(model: str, widths: list[int], data, extra: dict) -> dict:
    """Keyword arguments of ``--model`` for ``data``: the reference models (mlp, cnn1d,
    resnet) are sized from the data and ``--widths``; another registered factory gets
    ``in_features``/``out_features`` from the data when its signature has them; user code
    gets ``--model-args`` only. ``--model-args`` (``extra``) always wins."""
    if model in BUILT_IN_MODELS:
        return {**reference_model_arguments(model, widths, data), **extra}
    if ":" in model:
        return dict(extra)
    import inspect

    from ridgeline.models import FACTORIES

    if model not in FACTORIES:
        return dict(extra)
    sizes = reference_model_arguments("mlp", widths, data)
    parameters = inspect.signature(FACTORIES[model]).parameters
    filled = {k: sizes[k] for k in ("in_features", "out_features") if k in parameters}
    return {**filled, **extra}


@app.command("train")
def train_command(
    out: Path = typer.Option(..., "--out", help="Checkpoint path (.safetensors)."),
    model: str = typer.Option("mlp", "--model",
                              help="mlp, cnn1d, resnet, another registered model, or your own "
                                   "factory MODULE:CALLABLE (arguments from --model-args)."),
    model_args: str | None = typer.Option(
        None, "--model-args", help="Keyword arguments of the model as a JSON object; for mlp, "
                                   "cnn1d and resnet they override the sizes read from the data."),
    data: str = typer.Option("mnist1d", "--data",
                             help="mnist1d, digits, an .npz with x and y, or MODULE:CALLABLE."),
    data_args: str | None = data_args_option(),
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
    """Train a model (a reference model or your own factory) and save a checkpoint."""
    import torch

    from ridgeline.models import build_model
    from ridgeline.train import check_hyperparameters, save, train

    try:
        # every argument is checked before data is loaded or a step is taken
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give the checkpoint file to write, e.g. "
                              f"{out / 'model.safetensors'}.")
        if out.suffix != ".safetensors":
            raise ConfigError(f"--out {out}: checkpoints are written as safetensors; name the file "
                              f"{out.with_suffix('.safetensors').name}.")
        if out.parent.exists():  # a missing folder is created when the checkpoint is saved
            check_output_file(out, "--out")
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay, epochs=epochs,
                              batch_size=batch_size)
        options = parse_key_values(option, "--option")
        extra = parse_json_object(model_args, "--model-args")
        sizes = parse_ints(widths, "--widths")
        data_kwargs = parse_json_object(data_args, "--data-args")
        train_data = load_data(data, "train", args=data_kwargs)
        test_data = load_data(data, "test", args=data_kwargs)
        kwargs = model_arguments(model, sizes, train_data, extra)
        torch.manual_seed(seed)
        net = build_model(model, **kwargs)
        result = train(net, train_data, optimizer=optimizer, lr=lr, momentum=momentum,
                       weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, seed=seed,
                       eval_data=test_data, progress=progress_on(), **options)
        save(net, out, metadata={"data": data, "data_args": data_kwargs, "train": result.config})
    except RidgelineError as exc:
        fail(exc)
    final = result.final
    accuracy = final.get("eval_accuracy")
    typer.echo(f"saved {out}: train loss {final['train_loss']:.4f}, test accuracy "
               f"{float('nan') if accuracy is None else accuracy:.4f}, "
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
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from ridgeline import distributed

    if distributed.is_distributed():
        distributed.exit_process(code)  # under torchrun: no interpreter finalisation
    raise SystemExit(code)


if __name__ == "__main__":
    main()
