"""The run folder is locked: a second run on a folder in use is refused at once, the lock
goes with its process however it ends, and ``--out`` naming a file is a clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from study_helpers import CALLS, tiny
from typer.testing import CliRunner

from ridgeline.cli import app
from ridgeline.errors import ConfigError, RunInUseError
from ridgeline.study import config_from_dict, run_study
from ridgeline.study.lock import LOCK_NAME, RunLock
from ridgeline.study.store import ResultStore

# Another run holding the lock, as RunLock does it: flock on the file, then its record.
HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.time()}).encode())
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run (killed with SIGKILL at the end)."""
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), LOCK_NAME],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_on_a_folder_in_use_is_refused_before_any_work(holder):
    run, proc = holder
    CALLS.clear()
    with pytest.raises(RunInUseError, match=f"in use by process {proc.pid} ") as info:
        run_study(config_from_dict(tiny()), run, progress=False)
    assert "--out" in str(info.value)
    config = run.parent / "tiny.toml"
    config.write_text('name = "t"\n[[models]]\nname = "a"\nargs = { in_features = 40, '
                      'widths = [4], out_features = 10 }\n')
    result = CliRunner().invoke(app, ["study", str(config), "--out", str(run)])
    assert result.exit_code == 2 and f"in use by process {proc.pid}" in result.output
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written, nothing run
    assert CALLS == []


STUDY = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from study_helpers import tiny
    from ridgeline.study import config_from_dict, run_study
    config = tiny(measurements=[{"kind": "weights_sum", "id": "uses-a", "label": "a"},
                                {"kind": "weights_sum", "id": "hang", "label": "hang"}])
    run_study(config_from_dict(config), sys.argv[1], progress=False, report=False)
""")


def test_a_study_killed_mid_run_keeps_its_work_and_its_lock_goes_with_it(tmp_path):
    run = tmp_path / "run"
    run_study(config_from_dict(tiny(measurements=[])), run, progress=False, report=False)
    env = {**os.environ, "RIDGELINE_TEST_HANG": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", STUDY, str(run), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True, env=env)
    config = config_from_dict(tiny(measurements=[
        {"kind": "weights_sum", "id": "uses-a", "label": "a"},
        {"kind": "weights_sum", "id": "hang", "label": "hang"}]))
    try:
        assert proc.stdout.readline().strip() == "hanging"  # inside measurement "hang"
        with pytest.raises(RunInUseError, match=f"in use by process {proc.pid} "):
            run_study(config, run, progress=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert f'"pid": {proc.pid}' in (run / LOCK_NAME).read_text()  # its record is still there
    outcome = run_study(config, run, progress=False, report=False)  # its flock went with it
    assert outcome.ran == ["hang"] and outcome.skipped == ["train:a", "train:b", "uses-a"]


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    config = tiny(measurements=[{"kind": "weights_sum", "label": "boom"}])
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_study(config_from_dict(config), tmp_path, progress=False)
    assert (tmp_path / LOCK_NAME).read_text() == ""  # holder record cleared
    with RunLock(tmp_path) as lock:  # a new open file description: fails if still locked
        assert lock.stale is None
    with RunLock(tmp_path), pytest.raises(RunInUseError):
        RunLock(tmp_path).acquire()


def test_out_naming_an_existing_file_is_a_clear_error(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_study(config_from_dict(tiny()), existing, progress=False)
    config = tmp_path / "tiny.toml"
    config.write_text('name = "t"\n[[models]]\nname = "a"\nargs = { in_features = 40, '
                      'widths = [4], out_features = 10 }\n')
    result = CliRunner().invoke(app, ["study", str(config), "--out", str(existing)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert existing.read_text() == "keep me" and ResultStore(tmp_path).records() == []
    with pytest.raises(ConfigError, match="cannot create the run folder"):
        run_study(config_from_dict(tiny()), existing / "run", progress=False)


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    """On file systems without flock (some network mounts): held while the pid is alive."""
    import errno
    import fcntl
    import json
    import socket

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(RunInUseError, match=f"process {sleeper.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(tmp_path) as lock:  # the process is gone: a stale lock, taken over
        assert lock.stale["pid"] == sleeper.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: no holder
