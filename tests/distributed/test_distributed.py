"""Two gloo processes on CPU give the single-process values (float64: 1e-10, float32: 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed,
              pytest.mark.filterwarnings("ignore::ridgeline.errors.ConvergenceWarning")]

WORKER = Path(__file__).with_name("worker.py")
sys.path.insert(0, str(WORKER.parent))

import worker  # noqa: E402


def launch(tmp_path: Path, dtype: str, processes: int = 2) -> dict:
    out = tmp_path / f"{dtype}.json"
    # the workers import the ridgeline under test (not whatever is installed) and worker.py
    import ridgeline

    source = Path(ridgeline.__file__).resolve().parents[1]
    path = os.pathsep.join([str(WORKER.parent), str(source), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(WORKER), str(out), dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        # A gloo teardown abort (issue 13, item 11) seen once in a fresh-clone run on a loaded
        # machine even with the group destroyed at exit; exit_process now skips interpreter
        # finalisation. One relaunch keeps CI meaningful while that fix proves itself; the
        # abort is reported on stderr so it is never silent.
        print("distributed test: a rank aborted at teardown; relaunching once", file=sys.stderr)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    if dtype == "exit":
        return {r: json.loads((tmp_path / f"{out.name}.rank{r}").read_text())
                for r in range(processes)}
    return json.loads(out.read_text())


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_two_processes_equal_one(tmp_path, dtype, tol):
    worker._register_instrument_checks()
    model, data = worker.problem(getattr(torch, dtype))
    from ridgeline import Objective

    single = worker.quantities(Objective(model, data, batch_size=8))
    sharded = launch(tmp_path, dtype)
    assert sharded.pop("world_size") == [2]
    assert set(sharded) == set(single)
    for name, expected in single.items():
        got = torch.tensor(sharded[name], dtype=torch.float64)
        want = torch.tensor(expected, dtype=torch.float64)
        scale = max(1.0, float(want.abs().max()))
        assert torch.allclose(got, want, atol=tol * scale, rtol=0), (name, got, want)


def test_ranks_with_different_data_are_refused(tmp_path):
    error = launch(tmp_path, "mismatch")["error"]
    assert "the dataset size differs between processes" in error


def test_every_rank_destroys_its_group_before_the_interpreter_finalises(tmp_path):
    """The teardown race behind a SIGABRT ("terminate called without an active exception"):
    the gloo worker thread drops the last collective's work object (its tensors need the
    GIL) after wait() has returned; if the main thread is already in Py_FinalizeEx, CPython
    ends that thread with pthread_exit, whose unwinding crosses a noexcept destructor:
    std::terminate. init_from_environment's exit hook destroys the group (joining those
    threads) while Python is whole. Checked two ways: each rank sees its group destroyed by
    the time later exit handlers run (deterministic), and the ranks leave, rank 0 a second
    after the other, with no abort (before the hook, 2 ranks: 7 launches of 12 aborted;
    4 ranks: 6 of 6)."""
    ranks = launch(tmp_path, "exit", processes=2)
    for rank, record in ranks.items():
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["value"] == 1.0
        assert record["group_alive_at_exit"] is False, rank


def test_study_under_torchrun_writes_once_and_resumes(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text("""
name = "dist-tiny"
[data]
name = "gaussian_mixture"
args = { num_samples = 120, dim = 4, num_classes = 3 }
[training]
epochs = 1
batch_size = 32
[[models]]
name = "a"
factory = "mlp"
args = { in_features = 4, widths = [8], out_features = 3 }
[[measurements]]
kind = "curvature"
models = ["a"]
k = 2
""")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ridgeline", "-q", "study", str(config), "--out", str(out)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "terminate called" not in first.stderr, first.stderr[-3000:]
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert ids == ["study", "train:a", "curvature"]  # rank 0 alone wrote, once each
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "ran 0 measurements, 2 already done" in again.stdout
