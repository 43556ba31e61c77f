"""The ``ridgeline curvature`` command and the ``curvature`` study measurement."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import ridgeline
from ridgeline.cli import app
from ridgeline.models import mlp


def test_cli_prints_the_table(tmp_path):
    torch.manual_seed(0)
    model = mlp(40, [8], 10)
    path = tmp_path / "tiny.safetensors"
    ridgeline.save(model, path)
    result = CliRunner().invoke(app, ["-q", "curvature", str(path), "--data", "mnist1d",
                                      "--subset", "64", "--k", "2", "--trace", "--rtol", "0.2",
                                      "--sharpness", "--density", "--runs", "2", "--steps", "10",
                                      "--plot",
                                      str(tmp_path / "density.png")])
    assert result.exit_code == 0, result.output
    for label in ("λ1", "λ2", "top-k HVPs", "trace", "worst-case sharpness", "density"):
        assert label in result.output
    assert (tmp_path / "density.png").exists()


def test_cli_reports_errors_without_traceback(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    ridgeline.save(mlp(40, [2], 10), path)
    result = CliRunner().invoke(app, ["-q", "curvature", str(path), "--subset", "8", "--k", "500"])
    assert result.exit_code == 2 and "k=500" in result.output


def test_study_measurement_runs_and_reports(tmp_path):
    from ridgeline.study import config_from_dict, run_study

    cfg = config_from_dict({
        "name": "curv", "data": {"name": "mnist1d", "train_subset": 120, "test_subset": 50},
        "training": {"epochs": 1, "batch_size": 32},
        "models": [{"name": "a", "factory": "mlp",
                    "args": {"in_features": 40, "widths": [8], "out_features": 10}}],
        "measurements": [{"kind": "train", "model": "a"},
                         {"kind": "curvature", "models": ["a"], "subset": 100, "k": 2,
                          "overlap_k": 3, "runs": 2, "steps": 8, "sharpness_steps": 3,
                          "sharpness_samples": 3, "trace_rtol": 0.3}],
    })
    run_study(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["kind"] == "curvature")
    result = record["result"]["models"]["a"]
    assert result["examples"] == 100 and len(result["top"]["values"]) == 2
    assert {"trace", "density", "sharpness", "overlap"} <= set(result)
    html = (tmp_path / "report.html").read_text()
    assert "Hessian eigenvalue density" in html and "<svg" in html
