"""``ridgeline sw``: sliced Wasserstein distance between two point clouds stored as .npy."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register", "load_points"]


def load_points(path: Path):
    """An (n, d) float tensor from a .npy file (no pickles); (n,) is n points on the line."""
    import numpy as np
    import torch

    from ridgeline.errors import DataError

    if not path.exists():
        raise DataError(f"{path} does not exist.")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npy array of numbers: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise DataError(f"{path} must hold a numeric array of points (n, d).")
    if array.ndim not in (1, 2):
        raise DataError(f"{path} holds an array of shape {array.shape}; pass points as (n, d) "
                        "or (n,).")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if tensor.is_floating_point() else tensor.double()


def register(app: typer.Typer) -> None:
    @app.command("sw")
    def sw_command(
        x: Path = typer.Argument(..., help="First point cloud, .npy of shape (n, d)."),
        y: Path = typer.Argument(..., help="Second point cloud, .npy of shape (m, d)."),
        cv: str | None = typer.Option(None, "--cv", help="Control variate: lower or upper "
                                         "(p=2 only)."),
        projections: int = typer.Option(100, "--projections", "-L",
                                        help="Number of random directions L."),
        p: float = typer.Option(2.0, "--p", help="Order p ≥ 1 of the distance."),
        seed: int = typer.Option(0, "--seed", help="Seed of the directions."),
        use_max: bool = typer.Option(False, "--max", help="Max-sliced Wasserstein: optimise "
                                     "the direction instead of averaging."),
        steps: int = typer.Option(100, "--steps", help="Ascent steps for --max."),
        memory_budget: str | None = typer.Option(
            None, "--memory-budget", help="Memory the estimate may use, e.g. 4GiB (default: "
            "half the available memory); larger requests are refused before any work."),
    ) -> None:
        """Sliced Wasserstein distance SW_p between two point clouds (estimate ± std. error)."""
        from ridgeline.cli import fail
        from ridgeline.errors import ConfigError, RidgelineError
        from ridgeline.transport import max_sliced_wasserstein, sliced_wasserstein

        try:
            a, b = load_points(x), load_points(y)
            if use_max:
                if cv is not None:
                    raise ConfigError("--cv applies to the Monte Carlo estimate, not to --max.")
                value = max_sliced_wasserstein(a, b, steps=steps, p=p, seed=seed)
                typer.echo(f"max-SW_{p:g} = {float(value):.6g}  (optimised direction, "
                           f"{steps} ascent steps, n={a.shape[0]}, m={b.shape[0]})")
                return
            value, stderr = sliced_wasserstein(a, b, projections=projections, p=p,
                                               control_variate=cv, seed=seed, return_stderr=True,
                                               memory_budget=memory_budget)
        except RidgelineError as exc:
            fail(exc)
        label = "plain Monte Carlo" if cv is None else f"{cv} control variate"
        typer.echo(f"SW_{p:g} = {float(value):.6g} ± {float(stderr):.2g}  (L={projections}, "
                   f"{label}, seed {seed}, n={a.shape[0]}, m={b.shape[0]})")
