"""The ``ridgeline ntk`` command and the ``ntk`` study measurement on tiny models."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

import ridgeline
from ridgeline.cli import app
from ridgeline.models import mlp
from ridgeline.study import config_from_dict, get_measurement, run_study


def test_ntk_command_prints_spectrum_condition_and_alignment(tmp_path):
    torch.manual_seed(0)
    checkpoint = ridgeline.save(mlp(40, [16], 10), tmp_path / "net.safetensors")
    result = CliRunner().invoke(app, ["--quiet", "ntk", str(checkpoint), "--data", "mnist1d",
                                      "--n", "24", "--trace", "mean",
                                      "--plot", str(tmp_path / "spectrum.png")])
    assert result.exit_code == 0, result.output
    for word in ("λ1", "condition number", "alignment", "jacobian"):
        assert word in result.output
    assert (tmp_path / "spectrum.png").exists()


def test_ntk_command_reports_bad_options_without_traceback(tmp_path):
    checkpoint = ridgeline.save(mlp(40, [4], 10), tmp_path / "net.safetensors")
    result = CliRunner().invoke(app, ["ntk", str(checkpoint), "--n", "8", "--trace", "max"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["ntk", str(checkpoint), "--n", "8", "--memory-budget", "1KB"])
    assert result.exit_code == 2 and "memory_budget" in result.output


def test_ntk_measurement_runs_and_reports_drift_against_width(tmp_path):
    models = [{"name": name, "factory": "mlp", "init_seed": seed,
               "args": {"in_features": 40, "widths": [width], "out_features": 10}}
              for name, width, seed in (("narrow", 8, 1), ("wide", 64, 2))]
    cfg = config_from_dict({
        "name": "ntk-test", "data": {"name": "mnist1d", "train_subset": 96, "test_subset": 40},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "models": models,
        "measurements": [{"kind": "ntk", "models": ["narrow", "wide"], "n": 30,
                          "regression_n": 60, "test_n": 40}]})
    run_study(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["kind"] == "ntk")
    result = record["result"]
    for name in ("narrow", "wide"):
        entry = result["models"][name]
        values = np.array(entry["init"]["eigenvalues"])
        assert len(values) == 30 and np.all(np.diff(values) <= 1e-6 * values[0])
        assert 0 <= entry["drift"] <= 1 and entry["width"] in (8.0, 64.0)
        assert -1 <= entry["trained"]["centered_alignment"] <= 1
    # the kernel moves less in the wider network (Jacot et al. 2018; Lee et al. 2019: the
    # relative change shrinks with width); measured 0.018 at width 8 and 0.0022 at 64
    drift = {name: result["models"][name]["drift"] for name in ("narrow", "wide")}
    assert drift["wide"] < drift["narrow"] / 2, drift
    regression = result["regression"]
    assert regression["n_train"] == 60 and regression["n_test"] == 40
    assert regression["init_kernel"]["train_mse"] < 1e-3  # kernel regression interpolates
    assert 0 <= regression["network"]["test_accuracy"] <= 1
    kind = get_measurement("ntk")
    html = kind.report(record)
    assert html.count("<svg") == 2 and "drift" in html and "Kernel regression" in html
    summary = kind.summary(record)
    assert "drift wide" in summary and "network acc" in summary
    assert (tmp_path / "report.html").exists()
