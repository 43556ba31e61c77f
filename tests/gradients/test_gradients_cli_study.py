"""The ``fwdgrad`` command and the ``forward_gradient`` study measurement, on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ridgeline
from ridgeline.cli import app
from ridgeline.models import mlp
from ridgeline.study import config_from_dict, run_study

pytestmark = pytest.mark.filterwarnings("ignore:the auxiliary heads cost")


def test_fwdgrad_command_prints_cosines_per_layer(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=gen)
    y = torch.randint(0, 3, (80,), generator=gen)
    np.savez(tmp_path / "toy.npz", x=x.numpy(), y=y.numpy())
    torch.manual_seed(0)
    model = mlp(6, [10], 3)
    ckpt = ridgeline.save(model, tmp_path / "m.safetensors")
    out = tmp_path / "q.json"
    result = CliRunner().invoke(app, ["--quiet", "fwdgrad", str(ckpt), "--data",
                                      str(tmp_path / "toy.npz"), "--guess", "local",
                                      "--fit-epochs", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "cos(ĝ, g)" in result.output and "auxiliary heads" in result.output
    summary = json.loads(out.read_text())
    assert set(summary["per_layer"]) == {"1", "3"}
    assert summary["num_params"] == 6 * 10 + 10 + 10 * 3 + 3
    random = CliRunner().invoke(app, ["--quiet", "fwdgrad", str(ckpt), "--data",
                                      str(tmp_path / "toy.npz"), "--repeats", "3"])
    assert random.exit_code == 0 and "over 3 estimate(s)" in random.output
    bad = CliRunner().invoke(app, ["--quiet", "fwdgrad", str(ckpt), "--data",
                                   str(tmp_path / "toy.npz"), "--num-guesses", "0"])
    assert bad.exit_code == 2 and "num_guesses" in bad.output


def test_forward_gradient_measurement_runs_and_reports(tmp_path):
    config = config_from_dict({
        "name": "fg",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 200, "dim": 6, "num_classes": 3}},
        "training": {"epochs": 2, "batch_size": 32},
        "models": [{"name": "a", "factory": "mlp",
                    "args": {"in_features": 6, "widths": [16, 16], "out_features": 3}}],
        "measurements": [{"kind": "forward_gradient", "repeats": 3, "fit_epochs": 1,
                          "train_epochs": 2}],
    })
    outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == ["train:a", "forward_gradient"]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    result = records[-1]["result"]
    assert set(result["quality"]) == {"random", "rademacher", "local"}
    assert result["quality"]["random"]["repeats"] == 3
    assert set(result["training"]) == {"backprop", "forward-local", "forward-random"}
    assert result["training"]["backprop"]["time_ratio"] == 1.0
    assert result["training"]["forward-random"]["lr"] == pytest.approx(
        0.05 / result["num_params"] ** 0.5)
    html = (tmp_path / "report.html").read_text()
    assert "forward-local" in html and "1/√P" in html
