"""`ridgeline sweep` and `ridgeline report` on a sweep's run folder."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from ridgeline.cli import app
from ridgeline.study import ResultStore, config_from_dict
from ridgeline.sweep import run_sweep

runner = CliRunner()

TINY = """
name = "cli-sweep"
[data]
name = "gaussian_mixture"
args = { num_samples = 96, dim = 4, num_classes = 3 }
[training]
epochs = 1
batch_size = 32
[[models]]
name = "m"
factory = "mlp"
args = { in_features = 4, widths = [8], out_features = 3 }
"""


def test_sweep_command_refuses_bad_input_before_work(tmp_path):
    config = tmp_path / "plain.toml"
    config.write_text(TINY)
    result = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has no [sweep] table" in result.output
    config.write_text(TINY + '[sweep]\nseeds = [0]\n[sweep.grid]\n"training.lr" = [0.1]\n')
    result = runner.invoke(app, ["sweep", str(config), "--engine", "spark"])
    assert result.exit_code == 2 and "'local' or 'ray'" in result.output
    result = runner.invoke(app, ["sweep", str(config), "--gpus-per-task", "1"])
    assert result.exit_code == 2 and "--engine ray only" in result.output
    assert not (tmp_path / "run").exists()


def test_report_command_brings_the_correlation_record_up_to_date(tmp_path):
    import tomllib

    raw = tomllib.loads(TINY)
    raw["sweep"] = {"seeds": [0, 1], "grid": {"training.lr": [0.05, 0.2]}, "bootstrap": 20,
                    "measurements": [{"kind": "curvature", "subset": 40, "k": 1, "trace": False,
                                      "density": False, "overlap_k": 0, "sharpness_steps": 2,
                                      "sharpness_samples": 2}]}
    run_dir = tmp_path / "run"
    run_sweep(config_from_dict(raw), run_dir, engine="inprocess", progress=False, report=False)
    path = run_dir / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["kind"] == "generalization_correlation"
    path.write_text("".join(lines[:-1]))  # as if the driver died before writing it
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    latest = ResultStore(run_dir).latest()
    record = latest["generalization_correlation"]["result"]
    assert len(record["models"]) == 4 and record["axes"] == ["training.lr"]
    assert "λ_max" in record["correlations"]
    html = (run_dir / "report.html").read_text()
    assert "ridgeline sweep: cli-sweep" in html and "granulated" in html
    before = path.read_text()
    assert runner.invoke(app, ["report", str(run_dir)]).exit_code == 0
    assert path.read_text() == before  # nothing changed: no new record


def test_correlation_is_a_measurement_of_plain_studies(tmp_path):
    from scipy.stats import kendalltau

    models = "".join(f"""
[[models]]
name = "{n}"
factory = "mlp"
args = {{ in_features = 4, widths = [8], out_features = 3 }}
init_seed = {i}
training = {{ seed = {i}, lr = {lr} }}
""" for i, (n, lr) in enumerate([("a", 0.02), ("b", 0.1), ("c", 0.3)]))
    config = tmp_path / "study.toml"
    config.write_text(TINY.split("[[models]]")[0] + models + """
[[measurements]]
kind = "curvature"
models = ["a", "b", "c"]
subset = 40
k = 1
trace = false
density = false
overlap_k = 0
sharpness = false

[[measurements]]
kind = "generalization_correlation"
bootstrap = 0
""")
    result = runner.invoke(app, ["study", str(config), "--out", str(tmp_path / "run"),
                                 "--no-report"])
    assert result.exit_code == 0, result.output
    latest = ResultStore(tmp_path / "run").latest()
    record = latest["generalization_correlation"]["result"]
    lam = {m["id"]: m["measures"]["λ_max"] for m in record["models"]}
    curvature = latest["curvature"]["result"]["models"]
    assert lam == {n: curvature[n]["top"]["values"][0] for n in "abc"}
    gaps = [m["gaps"]["error"] for m in record["models"]]
    expected = kendalltau(list(lam.values()), gaps).statistic
    tau = record["correlations"]["λ_max"]["error"]["tau"]
    assert tau is None if math.isnan(expected) else tau == pytest.approx(expected, abs=1e-12)


def test_report_of_a_running_sweep_writes_no_record(tmp_path):
    import tomllib

    from ridgeline.study.lock import RunLock

    raw = tomllib.loads(TINY)
    raw["sweep"] = {"seeds": [0], "grid": {"training.lr": [0.05, 0.2]}, "bootstrap": 10}
    run_sweep(config_from_dict(raw), tmp_path, engine="inprocess", progress=False, report=False)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    before = path.read_text()
    with RunLock(tmp_path):  # as a driver holds it
        result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0 and "still running" in result.output
    assert path.read_text() == before and (tmp_path / "report.html").exists()
