"""Subspace training: projection cost as D grows, and d_int90 across widths and datasets.

Part ``timing``: time per training step (forward, backward, Adam step on z; batch 128 of
MNIST-1D) of an MLP trained in a d = 1000 subspace with the dense, sparse and Fastfood
projections, as the parameter count D grows, next to the full model's own step; the
projection's memory; and where dense exceeds the stated memory budget. Every projection's
column norms are checked on sampled columns (all ≈ 1).

Part ``dint``: d_int90 (90 % of the measured full-model test accuracy, same epochs) of MLPs
of two widths on MNIST-1D and on digits, with a coarse grid then bisection.

No peer library implements subspace training; the full (unprojected) model is the reference
for time, and the three projections are the reference for each other's accuracy.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.table import Table

from benchmarks.harness import console, timeit
from ridgeline.data import digits, mnist1d
from ridgeline.errors import MemoryBudgetError
from ridgeline.models import mlp
from ridgeline.subspace import SubspaceModel, intrinsic_dimension

MIB = 2**20
LRS = [1e-2, 3e-2]
BASELINE_LRS = [3e-3, 1e-2]


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _column_norms(sub: SubspaceModel, count: int = 16) -> float:
    cols = torch.linspace(0, sub.dim - 1, count).long()
    eye = torch.zeros(count, sub.dim)
    eye[torch.arange(count), cols] = 1.0
    with torch.no_grad():
        return float(sub.projection(eye).norm(dim=1).mean())


def timing(widths: list[int], dim: int, budget_mib: float, repeats: int) -> list[dict]:
    data = mnist1d("train")
    x, y = data.inputs[:128], data.targets[:128]
    rows = []
    for width in widths:
        torch.manual_seed(0)
        model = mlp(40, [width, width], 10)
        num = sum(p.numel() for p in model.parameters())
        seconds, _ = timeit(_step(model, x, y), repeats=repeats)
        rows.append({"D": num, "projection": "none (full model)", "ms/step": 1000 * seconds,
                     "memory MiB": 4 * num / MIB, "col norm": "", "build s": ""})
        for kind in ("dense", "sparse", "fastfood"):
            began = time.perf_counter()
            try:
                sub = SubspaceModel(model, dim, projection=kind, memory_budget=int(budget_mib * MIB))
            except MemoryBudgetError:
                need = 4 * num * dim / MIB
                rows.append({"D": num, "projection": kind, "ms/step": None,
                             "memory MiB": f"{need:.0f} > budget", "col norm": "", "build s": ""})
                continue
            built = time.perf_counter() - began
            seconds, _ = timeit(_step(sub, x, y), repeats=repeats)
            rows.append({"D": num, "projection": kind, "ms/step": 1000 * seconds,
                         "memory MiB": sub.projection.memory_bytes() / MIB,
                         "col norm": f"{_column_norms(sub):.3f}", "build s": f"{built:.2f}"})
            del sub
    _print(f"time per Adam step, d = {dim}, batch 128 (dense budget {budget_mib:.0f} MiB)", rows)
    return rows


def dint(epochs: int, baseline_epochs: int, projection: str, seeds: int) -> list[dict]:
    cases = [("mnist1d", mnist1d("train"), mnist1d("test"), 40, [[64, 64], [256, 256]]),
             ("digits", digits("train"), digits("test"), 64, [[32, 32], [128, 128]])]
    rows = []
    for name, train, test, inputs, all_widths in cases:
        results = []
        for widths in all_widths:
            began = time.perf_counter()
            num = sum(p.numel() for p in mlp(inputs, widths, 10).parameters())
            grid = [d for d in (10, 30, 100, 300, 1000, 3000, 10000) if d < num] + [min(num, 10000)]
            result = intrinsic_dimension(
                lambda inputs=inputs, widths=widths: mlp(inputs, widths, 10), train, eval_data=test,
                dims=grid, epochs=epochs, seeds=seeds, lr=LRS, baseline_lr=BASELINE_LRS,
                baseline_epochs=baseline_epochs, search="bisect", tol=0.15,
                projection=projection, progress=False)
            results.append((widths, result, time.perf_counter() - began))
        # the same absolute accuracy for every width: 90 % of the weakest full model
        common = min(r.target for _, r, _ in results)
        for widths, result, seconds in results:
            curve = ", ".join(f"{d}:{a:.2f}" for d, a in zip(result.dims, result.mean_accuracies))
            at_common = next((d for d, a in zip(result.dims, result.mean_accuracies) if a >= common), None)
            rows.append({"data": name, "widths": str(widths), "D": result.num_params,
                         "baseline": f"{result.baseline:.3f}", "target": f"{result.target:.3f}",
                         "d_int90": result.d_int90,
                         "d_int90/D": f"{result.d_int90 / result.num_params:.3f}" if result.d_int90 else "",
                         "d at common target": f"{at_common} (≥ {common:.3f})",
                         "runs": (len(result.dims) * len(LRS) + len(BASELINE_LRS)) * seeds,
                         "seconds": f"{seconds:.0f}", "accuracy by d": curve})
    _print(f"d_int90 ({projection}; Adam, best of lr {LRS} on z for {epochs} epochs, of "
           f"{BASELINE_LRS} for the full model for {baseline_epochs} epochs; {seeds} seed(s); "
           "test accuracy)", rows)
    return rows


def _print(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    keys = list(rows[0])
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*["skipped" if row[k] is None else
                        (f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k])) for k in keys])
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks subspace")
    parser.add_argument("--part", choices=["timing", "dint", "all"], default="all")
    parser.add_argument("--widths", default="64,256,1000,2000",
                        help="MLP widths (40-w-w-10) for the timing part.")
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--budget-mib", type=float, default=1024.0,
                        help="Memory budget of one projection (dense fails above it).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15, help="Epochs per subspace run.")
    parser.add_argument("--baseline-epochs", type=int, default=30)
    parser.add_argument("--projection", default="fastfood")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 gives stable timings on a shared machine).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part in ("timing", "all"):
        timing([int(w) for w in args.widths.split(",")], args.dim, args.budget_mib, args.repeats)
    if args.part in ("dint", "all"):
        dint(args.epochs, args.baseline_epochs, args.projection, args.seeds)


if __name__ == "__main__":
    main()
