"""Sliced Wasserstein: ridgeline (MC, lower/upper control variates) vs POT (numpy, torch).

Two pairs of point clouds: MNIST-1D class 0 vs class 1 (≈400 points each, d = 40) and a
generated 3-D pair (a torus and a trefoil-knot tube, 2048 points each). For each: time
per estimate at L = 1000 (same inputs, float32, every library; agreement checked on a
shared projection matrix), and the variance of the estimate over 200 seeds at L = 10 and
L = 100. Goals: ≥ 2× POT's throughput; lower-CV variance ≥ 10× below plain MC at L = 100
on the MNIST-1D pair.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from benchmarks.harness import Row, Skip, console, peer_available, print_table, timeit
from ridgeline.data import mnist1d
from ridgeline.transport import random_directions, sliced_wasserstein

ESTIMATORS = (("ridgeline", None), ("ridgeline lower CV", "lower"),
              ("ridgeline upper CV", "upper"))


def mnist1d_pair() -> tuple[torch.Tensor, torch.Tensor]:
    data = mnist1d("train")
    return data.class_subset(0).inputs.flatten(1), data.class_subset(1).inputs.flatten(1)


def point_cloud_pair(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy torus and a noisy trefoil-knot tube in R³, n points each."""
    gen = torch.Generator().manual_seed(seed)
    u, v = (2 * math.pi * torch.rand(2, n, generator=gen)).unbind(0)
    torus = torch.stack([(1 + 0.35 * torch.cos(v)) * torch.cos(u),
                         (1 + 0.35 * torch.cos(v)) * torch.sin(u), 0.35 * torch.sin(v)], 1)
    t = 2 * math.pi * torch.rand(n, generator=gen)
    knot = torch.stack([torch.sin(t) + 2 * torch.sin(2 * t), torch.cos(t) - 2 * torch.cos(2 * t),
                        -torch.sin(3 * t)], 1) / 2.5
    return (torus + 0.03 * torch.randn(n, 3, generator=gen),
            knot + 0.12 * torch.randn(n, 3, generator=gen) + torch.tensor([0.3, 0.0, 0.2]))


def pot_runner(backend: str, x: torch.Tensor, y: torch.Tensor):
    """A call of POT's sliced_wasserstein_distance on the same inputs, or Skip."""
    if not peer_available("ot"):
        raise Skip("POT is not installed (pip install pot)")
    import ot

    if backend == "numpy":
        xs, ys = x.numpy(), y.numpy()
    else:
        xs, ys = x, y
    return lambda L, seed, projections=None: float(ot.sliced_wasserstein_distance(
        xs, ys, n_projections=L, seed=seed, projections=projections))


def timing_rows(case: str, x: torch.Tensor, y: torch.Tensor, L: int, repeats: int) -> list[Row]:
    rows = []
    shared = random_directions(x.shape[1], L, seed=0, dtype=x.dtype)
    ours_shared = float(sliced_wasserstein(x, y, projections=shared))
    for label, cv in ESTIMATORS:
        seconds, value = timeit(lambda cv=cv: sliced_wasserstein(x, y, projections=L, seed=1,
                                                                 control_variate=cv),
                                repeats=repeats)
        rows.append(Row(case, label, seconds, f"SW₂ = {float(value):.5f}"))
    for backend in ("numpy", "torch"):
        label = f"POT ({backend})"
        try:
            run = pot_runner(backend, x, y)
        except Skip as why:
            rows.append(Row(case, label, None, str(why)))
            continue
        proj = shared.numpy().T if backend == "numpy" else shared.T.contiguous()
        gap = abs(run(L, 0, proj) - ours_shared)
        seconds, value = timeit(lambda run=run: run(L, 1), repeats=repeats)
        rows.append(Row(case, label, seconds, f"SW₂ = {value:.5f}; same directions: "
                                              f"|Δ| = {gap:.1e}"))
    return rows


def variance_rows(case: str, x: torch.Tensor, y: torch.Tensor, seeds: int,
                  grid: tuple[int, ...] = (10, 100)) -> list[Row]:
    """Variance of each estimator over ``seeds`` seeds at each L (seconds: per estimate at
    the largest L)."""
    runners = [(label, lambda L, s, cv=cv: float(sliced_wasserstein(
        x, y, projections=L, seed=s, control_variate=cv))) for label, cv in ESTIMATORS]
    try:
        runners.append(("POT (numpy)", pot_runner("numpy", x, y)))
    except Skip as why:
        console.print(f"[yellow]POT variance rows skipped: {why}[/yellow]")
    table: dict[str, dict] = {}
    for label, run in runners:
        table[label] = {}
        for L in grid:
            began = time.perf_counter()
            values = [run(L, s) for s in range(seeds)]
            table[label][L] = (statistics.variance(values), statistics.mean(values),
                               (time.perf_counter() - began) / seeds)
    rows = []
    mc = table["ridgeline"]
    for label, stats in table.items():
        extra = {f"var L={L}": f"{stats[L][0]:.3e}" for L in grid}
        extra.update({f"MC var ÷ var, L={L}": f"{mc[L][0] / stats[L][0]:.1f}×" for L in grid})
        rows.append(Row(case, label, stats[grid[-1]][2], f"{stats[grid[-1]][1]:.5f}", extra))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks transport")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats")
    parser.add_argument("--seeds", type=int, default=200, help="seeds for the variances")
    parser.add_argument("--projections", type=int, default=1000, help="L for the timings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (POT's numpy backend is single-threaded)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = {"MNIST-1D 0 vs 1": mnist1d_pair(), "3-D torus/trefoil": point_cloud_pair()}
    for name, (x, y) in pairs.items():
        console.print(f"{name}: x {tuple(x.shape)}, y {tuple(y.shape)}, {x.dtype}, "
                      f"{args.threads} thread(s)")
    timing = [row for name, (x, y) in pairs.items()
              for row in timing_rows(name, x, y, args.projections, args.repeats)]
    timed = print_table(f"Time per SW estimate at L = {args.projections} (median of "
                        f"{args.repeats})", timing)
    variance = [row for name, (x, y) in pairs.items()
                for row in variance_rows(name, x, y, args.seeds)]
    print_table(f"Variance of the SW₂ estimate over {args.seeds} seeds (time: per estimate at "
                "L = 100; result: mean SW₂ at L = 100)", variance)
    for name in pairs:
        for peer in ("POT (numpy)", "POT (torch)"):
            ratio = next((r["ratio"] for r in timed if r["case"] == name and r["library"] == peer),
                         None)
            if ratio is not None:
                verdict = "met" if ratio >= 2 else "NOT met"
                console.print(f"{name}: throughput vs {peer} {ratio:.1f}× (goal ≥ 2×: {verdict})")
    mnist = next(iter(pairs))
    row = next(r for r in variance if r.case.startswith(mnist) and r.library.endswith("lower CV"))
    reduction = float(row.extra["MC var ÷ var, L=100"].rstrip("×"))
    console.print(f"{mnist}: lower-CV variance reduction at L=100 {reduction:.1f}× "
                  f"(goal ≥ 10×: {'met' if reduction >= 10 else 'NOT met'})")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
