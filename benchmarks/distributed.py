"""Top-5 Hessian eigenvalues over the full MNIST-1D training set with 1 vs 2 processes.

Each configuration is launched with ``torchrun --standalone`` (gloo on CPU, NCCL on GPU);
every rank trains the same 40-256-256-10 MLP (same seed), then Lanczos runs on the sharded
Objective. Rank 0 reports the wall time of ``top_eigenvalues`` and the eigenvalues.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import Row, print_table


def worker(out: str, batch_size: int) -> None:
    import torch

    import ridgeline
    from ridgeline import curvature, distributed
    from ridgeline.data import mnist1d
    from ridgeline.models import mlp

    distributed.init_from_environment()
    torch.manual_seed(0)
    model = mlp(40, [256, 256], 10)
    train = mnist1d("train")
    ridgeline.train(model, train, epochs=5, progress=False, seed=0)
    objective = ridgeline.Objective(model, train, batch_size=batch_size)
    distributed.barrier()
    began = time.perf_counter()
    spectrum = curvature.top_eigenvalues(objective, k=5, tol=1e-4, seed=0)
    seconds = time.perf_counter() - began
    if distributed.is_main_process():
        with open(out, "w") as handle:
            json.dump({"seconds": seconds, "values": spectrum.values.tolist(),
                       "matvecs": spectrum.matvecs, "world": distributed.world_size()}, handle)


def launch(nproc: int, batch_size: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "benchmarks.distributed", "--worker", out,
                   "--batch-size", str(batch_size)]
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        with open(out) as handle:
            return json.load(handle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks distributed")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process (default: cores / processes)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch_size)
        return
    cores = os.cpu_count() or 1
    rows, reference = [], None
    for nproc in (1, 2):
        threads = args.threads or max(1, cores // nproc)
        result = launch(nproc, args.batch_size, threads=threads)
        reference = reference or result["values"]
        error = max(abs(a - b) / abs(b) for a, b in zip(result["values"], reference))
        rows.append(Row("top-5 eigenvalues, MNIST-1D 4000 ex.", "ridgeline" if nproc == 1 else
                        f"ridgeline ×{nproc} processes", result["seconds"],
                        f"λ1 {result['values'][0]:.4f}, max rel Δ vs 1 proc {error:.1e}",
                        {"matvecs": result["matvecs"], "threads/proc": threads}))
    print_table(f"data-parallel Lanczos on {cores} cores (gloo)", rows)


if __name__ == "__main__":
    main(sys.argv[1:])
