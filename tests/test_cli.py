"""CLI smoke tests with typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ridgeline import __version__
from ridgeline.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_study_then_report(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text("""
name = "cli-tiny"
[data]
name = "gaussian_mixture"
args = { num_samples = 96, dim = 4, num_classes = 3 }
[training]
epochs = 1
batch_size = 32
[[models]]
name = "a"
factory = "mlp"
args = { in_features = 4, widths = [8], out_features = 3 }
""")
    out = tmp_path / "run"
    result = runner.invoke(app, ["--quiet", "study", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and (out / "report.html").exists()
    assert (out / "config.toml").read_text() == config.read_text()
    (out / "report.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0 and (out / "report.html").exists()
    again = runner.invoke(app, ["--quiet", "study", str(config), "--out", str(out)])
    assert "ran 0 measurements, 1 already done" in again.output


def test_study_reports_config_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nepochs = 3\n')
    result = runner.invoke(app, ["study", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown key 'epochs'" in result.output
    missing = runner.invoke(app, ["study", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_train_command_writes_a_loadable_checkpoint(tmp_path):
    import numpy as np
    import torch

    import ridgeline

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(64, 6)).astype("float32"),
             y=rng.integers(0, 3, 64))
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["--quiet", "train", "--data", str(tmp_path / "d.npz"), "--widths", "8",
                                 "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = ridgeline.load(out)
    assert model(torch.randn(2, 6)).shape == (2, 3)
    info = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert info["architecture"]["factory"] == "mlp"
