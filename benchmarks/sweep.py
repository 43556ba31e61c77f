"""The same 16-model sweep in one process, on the local engine with 1 and 2 workers, and on
Ray with 2 CPUs: wall time, speed-up, and overhead per task.

Each mode runs in a fresh Python process and pays its own start-up (the local engine's
forkserver, the Ray instance), as a ``ridgeline sweep`` command does; wall time is that of
``run_sweep`` (the driver's own imports excluded, equal for all modes). Overhead per task
= (wall × slots − T₁) / tasks, where T₁ is the wall time of running the
tasks one after another in one process and slots the tasks that run at once: the
worker-seconds an engine spends beyond the work itself (process start, imports, transfer
of records and checkpoints, scheduling). Every mode must write the same records.

    python -m benchmarks sweep [--modes inprocess,local1,local2,ray2] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

CONFIG = {
    "name": "bench-sweep",
    "seed": 0,
    "data": {"name": "mnist1d"},
    "training": {"epochs": 4, "batch_size": 128, "momentum": 0.9},
    "models": [{"name": "mlp", "factory": "mlp",
                "args": {"in_features": 40, "widths": [64], "out_features": 10}}],
    "sweep": {"seeds": [0, 1, 2, 3], "bootstrap": 200,
              "grid": {"training.lr": [0.02, 0.1], "training.batch_size": [64, 256]},
              "measurements": [{"kind": "curvature", "subset": 500, "k": 1, "density": False,
                                "overlap_k": 0, "trace_rtol": 0.2, "sharpness_steps": 10,
                                "sharpness_samples": 10}]},
}
TIMING = ("started", "duration_s", "worker", "seconds", "time_per_step")


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _records(run_dir: Path) -> dict:
    from ridgeline.study import ResultStore

    return {r["id"]: _strip(r) for r in ResultStore(run_dir).records()
            if r["kind"] in ("train", "curvature", "sweep_model")}


def run_mode(mode: str, root: Path) -> dict:
    from ridgeline.study import config_from_dict
    from ridgeline.sweep import run_sweep

    engine, workers = {"inprocess": ("inprocess", None), "local1": ("local", 1),
                       "local2": ("local", 2), "ray2": ("ray", 2)}[mode]
    run_dir = root / mode
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    outcome = run_sweep(config_from_dict(CONFIG), run_dir, engine=engine, workers=workers,
                        progress=False, report=False)
    wall = time.perf_counter() - began
    if outcome.failed:
        raise RuntimeError(f"{mode}: tasks failed: {outcome.failed}")
    return {"mode": mode, "slots": workers or 1, "tasks": len(outcome.ran), "wall_s": wall,
            "records": _records(run_dir)}


def run_mode_in_child(mode: str, root: Path) -> dict:
    """``run_mode`` in a fresh Python process, so that every mode pays its own start-up
    (a forkserver, a Ray instance) as a ``ridgeline sweep`` command would."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--child", mode, str(root)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    import torch

    from benchmarks.harness import console

    parser = argparse.ArgumentParser(prog="python -m benchmarks sweep")
    parser.add_argument("--modes", default="inprocess,local1,local2,ray2")
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=1, help="median over this many runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from ridgeline.data import load_dataset

    for split in ("train", "test"):  # generate and cache the data once, outside every timing
        load_dataset(CONFIG["data"]["name"], split)
    root = Path(tempfile.mkdtemp(prefix="ridgeline-bench-sweep-"))
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every mode alike
        for mode in modes:
            runs[mode].append(run_mode_in_child(mode, root))
    results = []
    for mode in modes:
        ordered = sorted(runs[mode], key=lambda r: r["wall_s"])
        results.append({**ordered[len(ordered) // 2], "all_s": [round(r["wall_s"], 1)
                                                                 for r in runs[mode]]})
    base = next((r for r in results if r["mode"] == "inprocess"), None)
    rows = []
    for r in results:
        row = {"mode": r["mode"], "slots": r["slots"], "tasks": r["tasks"],
               "wall_s": round(r["wall_s"], 1), "runs_s": r["all_s"]}
        if base is not None:
            row["speed_up"] = round(base["wall_s"] / r["wall_s"], 2)
            row["overhead_per_task_s"] = round(
                (r["wall_s"] * r["slots"] - base["wall_s"]) / r["tasks"], 2)
            row["same_records"] = r["records"] == base["records"]
        rows.append(row)
    from rich.table import Table

    table = Table(title="16-model sweep (MNIST-1D MLP 40-64-10, 4 epochs, curvature)")
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        import hashlib

        import torch

        torch.set_num_threads(1)
        result = run_mode(sys.argv[2], Path(sys.argv[3]))
        result["records"] = hashlib.sha256(json.dumps(result["records"], sort_keys=True)
                                           .encode()).hexdigest()
        print(json.dumps(result))
    else:
        main()
