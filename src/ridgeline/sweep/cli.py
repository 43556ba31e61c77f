"""``ridgeline sweep CONFIG.toml``: run a study's [sweep] on local processes or Ray."""

from __future__ import annotations

from pathlib import Path

import typer

from ridgeline.errors import RidgelineError


def register(app: typer.Typer) -> None:
    from ridgeline.sweep import kind  # noqa: F401 - the report knows the correlation record

    @app.command("sweep")
    def sweep_command(
        config: Path = typer.Argument(..., help="Study TOML with a [sweep] table."),
        engine: str = typer.Option("local", "--engine", help="local (worker processes) or ray."),
        address: str | None = typer.Option(
            None, "--address", help="Ray cluster: auto or ray://HOST:PORT (default: start Ray "
                                    "on this machine)."),
        workers: int | None = typer.Option(
            None, "--workers", help="Tasks at once (local: processes, default min(CPUs, 4); "
                                    "ray: in flight, default all)."),
        gpus_per_task: float = typer.Option(0.0, "--gpus-per-task", help="GPUs per Ray task."),
        out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<name>)."),
        preset: str | None = typer.Option(None, "--preset", help="A preset of the config."),
        no_report: bool = typer.Option(False, "--no-report", help="Skip writing report.html."),
    ) -> None:
        """Train and measure every model of the grid × seeds; resume what a crash left."""
        from ridgeline.cli_options import fail, progress_on
        from ridgeline.study import load_config
        from ridgeline.sweep.runner import run_sweep

        try:
            if engine not in ("local", "ray"):
                raise_config(f"--engine must be 'local' or 'ray'; got {engine!r}.")
            cfg = load_config(config, preset=preset)
            text = None if preset else config.read_text()
            outcome = run_sweep(cfg, out, engine=engine, workers=workers, address=address,
                                gpus_per_task=gpus_per_task, progress=progress_on(),
                                report=not no_report, config_text=text)
        except RidgelineError as exc:
            fail(exc)
        except KeyboardInterrupt:
            typer.secho("interrupted: finished models are kept in results.jsonl; run the same "
                        "command again to resume.", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None
        typer.echo(f"ran {len(outcome.ran)} models, {len(outcome.skipped)} already done, "
                   f"{len(outcome.failed)} failed ({outcome.seconds:.1f} s)")
        typer.echo(f"results: {outcome.run_dir / 'results.jsonl'}")
        if outcome.report:
            typer.echo(f"report:  {outcome.report.resolve()}")
        if outcome.failed:
            raise typer.Exit(1)


def raise_config(message: str) -> None:
    from ridgeline.errors import ConfigError

    raise ConfigError(message)
