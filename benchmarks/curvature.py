"""Hessian eigenvalues and trace: ridgeline vs PyHessian, hessian-eigenthings, curvlinops.

One trained MNIST-1D MLP (40-256-256-10, 4000 examples, 10 epochs of SGD), the full dataset
as one batch, cross-entropy. Reference eigenvalues come from a tight ``scipy.sparse.linalg
.eigsh`` (tol 1e-10) on ridgeline's operator. For top-1 and top-5 every library's accuracy
knob (tolerance or iteration count) is scanned from loose to tight and the first setting
whose eigenvalues are all within relative error 1e-4 of the reference is timed; the table
says which setting that was. Trace: products needed for a 5 % relative standard error,
ridgeline's Hutchinson/Hutch++ (which stop on it) against PyHessian's Hutchinson (which
stops on the relative change of the running mean, tol 1e-3, and reports no error bar; its
samples are used to compute the error it reached, and the first sample count at which its
running standard error was ≤ 5 %).

By default torch runs on one thread and times are CPU seconds of this process
(``time.process_time``), which shared machines disturb far less than wall time; wall
seconds are printed too (``--threads N`` changes the thread count).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.harness import Row, Skip, peer_available, print_table

TARGET = 1e-4


def _train_model(epochs: int):
    import ridgeline
    from ridgeline.data import mnist1d
    from ridgeline.models import mlp

    data = mnist1d("train")
    torch.manual_seed(0)
    model = mlp(40, [256, 256], 10)
    ridgeline.train(model, data, epochs=epochs, lr=0.05, momentum=0.9, seed=0, progress=False)
    return model.eval(), data.inputs, data.targets


def _clock(fn: Callable[[], object]) -> tuple[float, float, object]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def _error(values, reference: np.ndarray) -> float:
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1][:len(reference)]
    if len(values) < len(reference):
        return math.inf
    return float(np.max(np.abs(values - reference) / np.abs(reference)))


# ----------------------------------------------------------------------------- libraries
def ridgeline_top(model, x, y, k: int, tol: float):
    from ridgeline.curvature import top_eigenvalues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spectrum = top_eigenvalues(model, (x, y), k=k, tol=tol, seed=0, vectors=False)
    return spectrum.values.tolist(), spectrum.matvecs


def pyhessian_top(model, x, y, k: int, tol: float):
    if not peer_available("pyhessian"):
        raise Skip("pip install pyhessian")
    import sys

    module = sys.modules["pyhessian.hessian"]  # the package re-exports a class of that name
    from pyhessian import hessian as PyHessian

    original, calls = module.hessian_vector_product, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        h = PyHessian(model, F.cross_entropy, data=(x, y), cuda=False)
        values, _ = h.eigenvalues(maxIter=2000, tol=tol, top_n=k)
    finally:
        module.hessian_vector_product = original
    return values, calls[0]


def eigenthings_top(model, x, y, k: int, steps: int):
    if not peer_available("hessian_eigenthings"):
        raise Skip("pip install hessian-eigenthings")
    from hessian_eigenthings import HessianOperator, lanczos, supervised_loss

    op = HessianOperator(model, [(x, y)], supervised_loss(F.cross_entropy))
    result = lanczos(op, k=k, max_iter=steps, which="LA", seed=0, reorthogonalize=True)
    return result.eigenvalues.tolist(), steps


def curvlinops_top(model, x, y, k: int, tol: float):
    if not peer_available("curvlinops"):
        raise Skip("pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch "
                   "(torch must stay as is) plus einops einconv opt-einsum linear_operator")
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(x, y)],
                               check_deterministic=False).to_scipy()
    calls = [0]
    matvec = op.matvec

    def counted(v):
        calls[0] += 1
        return matvec(v)

    wrapped = LinearOperator(op.shape, matvec=counted, dtype=op.dtype)
    start = np.random.default_rng(0).standard_normal(op.shape[0])
    values = eigsh(wrapped, k=k, which="LA", tol=tol, v0=start, return_eigenvectors=False)
    return values.tolist(), calls[0]


# ----------------------------------------------------------------------------- scans
# fine grids for both Lanczos codes: ridgeline's residual tolerance on a 1-2-3-5-7 log grid,
# hessian-eigenthings' iteration count in steps of 1 (its smallest count that reaches 1e-4)
SCANS = {
    "ridgeline": (ridgeline_top, "tol", [1e-1, 7e-2, 5e-2, 3e-2, 2e-2, 1e-2, 7e-3, 5e-3, 3e-3,
                                         2e-3, 1e-3, 1e-4]),
    "PyHessian": (pyhessian_top, "tol", [1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6]),
    "hessian-eigenthings": (eigenthings_top, "max_iter", list(range(5, 41)) + [50, 70]),
    "curvlinops + eigsh": (curvlinops_top, "tol", [1e-1, 1e-2, 1e-3, 1e-4, 1e-6]),
}


def scan(name: str, model, x, y, k: int, reference: np.ndarray) -> Row:
    """The first setting of ``name``'s knob that reaches the target (its time is then the
    best of this run and the interleaved re-runs of :func:`best_of`)."""
    fn, knob, settings = SCANS[name]
    case = f"top-{k} to rel. err ≤ {TARGET:g}"
    tried = []
    try:
        for setting in settings:
            if knob == "max_iter" and setting < k:
                continue
            cpu, wall, (values, matvecs) = _clock(lambda s=setting: fn(model, x, y, k, s))
            err = _error(values, reference[:k])
            tried.append(f"{setting:g}:{err:.0e}")
            if err <= TARGET:
                row = Row(case, name, cpu, f"max rel. err {err:.1e}",
                          {"setting": f"{knob}={setting:g}", "HVPs": matvecs,
                           "wall s": f"{wall:.2f}"})
                row.rerun = lambda s=setting: fn(model, x, y, k, s)  # type: ignore[attr-defined]
                return row
    except Skip as exc:
        return Row(case, name, None, f"skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the benchmark
        return Row(case, name, None, f"failed: {type(exc).__name__}: {str(exc)[:60]}")
    return Row(case, name, None, "never reached the target: " + ", ".join(tried))


def best_of(rows: list[Row], repeats: int) -> None:
    """Re-run every row's chosen setting ``repeats`` more times, the libraries taking turns
    (so load drifts of a shared machine hit all alike), and keep each one's best CPU time."""
    timed = [r for r in rows if getattr(r, "rerun", None) is not None]
    for _ in range(repeats):
        for row in timed:
            cpu, wall, _ = _clock(row.rerun)
            if cpu < row.seconds:
                row.seconds = cpu
                row.extra["wall s"] = f"{wall:.2f}"
    for row in timed:
        row.extra["timing"] = f"best of {repeats + 1}, interleaved"


def count_flops(rows: list[Row]) -> None:
    """Matrix-multiply FLOPs of each row's chosen setting (one more run under
    ``torch.utils.flop_counter``): where both tools run GEMMs at the same speed, the
    peer/ridgeline time ratio can reach about the FLOP ratio and not much more."""
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    registry, aten = flop_counter.flop_registry, torch.ops.aten
    registry.setdefault(aten.addmm_, registry[aten.addmm])  # in-place GEMMs count too
    for row in rows:
        if getattr(row, "rerun", None) is None:
            continue
        with FlopCounterMode(display=False) as counter:
            row.rerun()
        row.extra["GFLOP"] = f"{counter.get_total_flops() / 1e9:.1f}"


def _pyhessian_trace(model, x, y, seed: int) -> np.ndarray:
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    h = PyHessian(model, F.cross_entropy, data=(x, y), cuda=False)
    return np.asarray(h.trace(maxIter=1000, tol=1e-3))


def trace_rows(model, x, y, seeds: int) -> list[Row]:
    """Products to a 5 % relative standard error, median over ``seeds`` random seeds."""
    from ridgeline.curvature import trace

    case = f"trace to 5 % rel. std. error (median of {seeds} seeds)"
    rows = []
    for method in ("hutchinson", "hutch++"):
        runs = [_clock(lambda m=method, s=s: trace(model, (x, y), method=m, rtol=0.05, seed=s))
                for s in range(seeds)]
        values = [r[2] for r in runs]
        rows.append(Row(case, "ridgeline" if method == "hutchinson" else "ridgeline hutch++",
                        float(np.median([r[0] for r in runs])),
                        f"{np.median([v.value for v in values]):.1f}, rel. s.e. "
                        f"{np.median([v.relative_stderr for v in values]):.1%}",
                        {"HVPs": f"{np.median([v.matvecs for v in values]):g} "
                                 f"({min(v.matvecs for v in values)}–{max(v.matvecs for v in values)})",
                         "wall s": f"{np.median([r[1] for r in runs]):.2f}",
                         "setting": f"{method}, rtol=0.05 (stops on its std. error)"}))
    if not peer_available("pyhessian"):
        rows.append(Row(case, "PyHessian", None, "skipped: pip install pyhessian"))
        return rows
    runs = [_clock(lambda s=s: _pyhessian_trace(model, x, y, s)) for s in range(seeds)]
    counts, rels, firsts = [], [], []
    for _, _, samples in runs:
        n = len(samples)
        counts.append(n)
        rels.append(samples.std(ddof=1) / math.sqrt(n) / abs(samples.mean()))
        running = [samples[:i].std(ddof=1) / math.sqrt(i) / abs(samples[:i].mean())
                   for i in range(10, n + 1)]
        firsts.append(next((i + 10 for i, r in enumerate(running) if r <= 0.05), math.nan))
    rows.append(Row(case, "PyHessian", float(np.median([r[0] for r in runs])),
                    f"{np.median([r[2].mean() for r in runs]):.1f}, rel. s.e. "
                    f"{np.median(rels):.1%} (not reported by PyHessian)",
                    {"HVPs": f"{np.median(counts):g} ({min(counts)}–{max(counts)})",
                     "wall s": f"{np.median([r[1] for r in runs]):.2f}",
                     "setting": "tol=1e-3 (stops on rel. change of the mean); its samples "
                                f"first reach ≤5 % at a median {np.nanmedian(firsts):g} HVPs"}))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks curvature")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--libraries", default=",".join(SCANS))
    parser.add_argument("--no-trace", action="store_true")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each library's chosen setting (best is kept)")
    parser.add_argument("--seeds", type=int, default=5, help="Seeds for the trace comparison.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from scipy.sparse.linalg import eigsh

    from ridgeline.curvature import hessian

    began = time.perf_counter()
    model, x, y = _train_model(args.epochs)
    print(f"trained 40-256-256-10 on {len(x)} MNIST-1D examples in "
          f"{time.perf_counter() - began:.0f} s")
    operator = hessian(model, (x, y))
    reference = np.sort(eigsh(operator.to_scipy(), k=8, which="LA", tol=1e-10,
                              return_eigenvectors=False))[::-1]
    print("reference top eigenvalues (eigsh, tol 1e-10):", np.array2string(reference[:5], precision=6))
    rows = []
    for k in (1, 5):
        case = [scan(name, model, x, y, k, reference) for name in args.libraries.split(",")]
        best_of(case, args.repeats - 1)
        count_flops(case)
        rows += case
    if not args.no_trace:
        rows += trace_rows(model, x, y, args.seeds)
    print_table(f"Hessian eigenvalues and trace, CPU seconds at {args.threads} thread(s) "
                "(peer/ridgeline > 1: ridgeline faster)", rows)


if __name__ == "__main__":
    main()
