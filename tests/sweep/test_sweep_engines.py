"""A 4-model sweep (2 lr × 2 seeds, digits, 2 epochs): the same records on the local engine
and on a local Ray cluster, a killed Ray worker or driver loses and duplicates nothing, and
the correlation record equals scipy.stats.kendalltau on the recorded numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import kendalltau

from ridgeline.study import ResultStore, config_from_dict
from ridgeline.sweep import run_sweep

CONFIG = """
name = "four"
seed = 0
[data]
name = "digits"
[training]
epochs = 2
batch_size = 64
[[models]]
name = "m"
factory = "mlp"
args = { in_features = 64, widths = [16], out_features = 10 }
[sweep]
seeds = [0, 1]
bootstrap = 100
[sweep.grid]
"training.lr" = [0.02, 0.1]
[[sweep.measurements]]
kind = "curvature"
subset = 200
k = 1
density = false
overlap_k = 0
trace_rtol = 0.2
sharpness_steps = 5
sharpness_samples = 4
"""
TIMING = ("started", "duration_s", "worker", "seconds", "time_per_step")


def _config():
    import tomllib

    return config_from_dict(tomllib.loads(CONFIG))


def _strip(value):
    """A record without wall-clock fields (everything else must match exactly)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _task_records(run_dir: Path) -> dict[str, dict]:
    records = ResultStore(run_dir).records()
    ids = [r["id"] for r in records]
    assert [i for i, n in Counter(ids).items() if n > 1] == []  # nothing written twice
    return {r["id"]: _strip(r) for r in records if r["kind"] not in ("study",)
            and r["kind"] != "generalization_correlation"}


def _kill_one_worker_later(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL one worker process of the local engine once it has been alive for 0.2 s."""
    import multiprocessing

    seen: dict[int, float] = {}
    while not stop.is_set():
        for child in multiprocessing.active_children():
            first = seen.setdefault(child.pid, time.time())
            if time.time() - first > 0.2:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except OSError:
                    continue  # it exited first
                killed.append(child.pid)
                return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The local engine with 2 workers, one of which is killed mid-sweep."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    killed: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=_kill_one_worker_later, args=(killed, stop), daemon=True)
    thread.start()
    try:
        outcome = run_sweep(_config(), run_dir, engine="local", workers=2, progress=False)
    finally:
        stop.set()
        thread.join(10)
    assert len(outcome.ran) == 4 and not outcome.failed
    return run_dir, killed


@pytest.fixture(scope="module")
def local_dir(local_run):
    return local_run[0]


def test_local_engine_survives_a_killed_worker_process(local_run):
    run_dir, killed = local_run
    assert killed, "no worker process was killed"
    assert all(r["status"] == "ok" for r in ResultStore(run_dir).records())


def test_local_sweep_writes_every_record_once_and_a_report(local_dir):
    records = _task_records(local_dir)
    kinds = Counter(r["kind"] for r in records.values())
    assert kinds == {"train": 4, "curvature": 4, "sweep_model": 4}
    assert len(list((local_dir / "checkpoints").glob("*.safetensors"))) == 8  # init + trained
    html = (local_dir / "report.html").read_text()
    assert "Sharpness and generalization" in html and "λ_max" in html and "<svg" in html


def test_correlation_record_equals_scipy_kendalltau_on_recorded_numbers(local_dir):
    latest = ResultStore(local_dir).latest()
    models = [r["result"] for r in latest.values() if r["kind"] == "sweep_model"]
    lam = [latest[f"curvature:{m['model']}"]["result"]["models"][m["model"]]["top"]["values"][0]
           for m in models]
    worst = [latest[f"curvature:{m['model']}"]["result"]["models"][m["model"]]["sharpness"]
             ["worst"]["value"] for m in models]
    record = latest["generalization_correlation"]["result"]["correlations"]
    for name, values in (("λ_max", lam), ("worst sharpness", worst)):
        for gap in ("error", "loss"):
            expected = kendalltau(values, [m[f"gap_{gap}"] for m in models]).statistic
            assert record[name][gap]["tau"] == pytest.approx(expected, abs=1e-12)
            assert record[name][gap]["n"] == 4


def test_killed_driver_resumes_without_loss_or_duplicates(local_dir, tmp_path):
    config_path = tmp_path / "four.toml"
    config_path.write_text(CONFIG)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    driver = subprocess.Popen([sys.executable, "-m", "ridgeline", "-q", "sweep", str(config_path),
                               "--out", str(run_dir), "--workers", "1", "--no-report"],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    results = run_dir / "results.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and driver.poll() is None:
            if results.exists() and results.read_text().count('"kind":"sweep_model"') >= 1:
                break
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its worker, mid-sweep
        driver.wait()
    first = {r["id"] for r in ResultStore(run_dir).records()}
    assert 1 <= sum(i.startswith("model:") for i in first) < 4
    outcome = run_sweep(_config(), run_dir, engine="inprocess", progress=False, report=False)
    finished = {i.split(":", 1)[1] for i in first if i.startswith("model:")}
    assert finished <= set(outcome.skipped) and len(outcome.ran) + len(outcome.skipped) == 4
    assert _task_records(run_dir) == _task_records(local_dir)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    if not Path("/proc").is_dir():
        pytest.skip("finding Ray worker processes needs /proc (Linux)")
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ridgeline[ray]')")
    saved = os.environ.get("RIDGELINE_CACHE")
    os.environ["RIDGELINE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RIDGELINE_CACHE", None)
        else:
            os.environ["RIDGELINE_CACHE"] = saved


def test_ray_engine_gives_the_same_records_as_the_local_engine(ray_cluster, local_dir, tmp_path):
    outcome = run_sweep(_config(), tmp_path / "ray", engine="ray", progress=False, report=False)
    assert len(outcome.ran) == 4 and not outcome.failed
    assert _task_records(tmp_path / "ray") == _task_records(local_dir)


def _ray_task_processes() -> list[int]:
    """Pids of Ray workers running a sweep task (Ray sets their title to ray::run_task)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::run_task"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_killed_ray_worker_is_retried_and_nothing_is_lost_or_duplicated(ray_cluster, local_dir,
                                                                        tmp_path):
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in _ray_task_processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    continue  # it finished first; try the next one
                killed.append(pid)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        outcome = run_sweep(_config(), tmp_path / "ray", engine="ray", progress=False,
                            report=False)
    finally:
        stop.set()
        thread.join(10)
    assert killed, "no Ray worker was running a task to kill"
    assert len(outcome.ran) == 4 and not outcome.failed
    assert _task_records(tmp_path / "ray") == _task_records(local_dir)
    assert json.loads(json.dumps(outcome.ran))  # every task reported once
