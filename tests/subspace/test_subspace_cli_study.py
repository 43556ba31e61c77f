"""The ``ridgeline intrinsic-dim`` command and the ``intrinsic_dimension`` study measurement."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ridgeline.cli import app
from ridgeline.study import ResultStore, config_from_dict, run_study


def test_cli_prints_accuracy_per_d_and_d_int90(tmp_path):
    out = tmp_path / "result.json"
    result = CliRunner().invoke(app, [
        "intrinsic-dim", "--model", "mlp", "--data", "digits", "--widths", "16",
        "--dims", "4,64", "--epochs", "2", "--subset", "300", "--projection", "sparse",
        "--baseline", "1.0", "--json", str(out), "--plot", str(tmp_path / "acc.png")])
    assert result.exit_code == 0, result.output
    assert "D = 1210 parameters" in result.output  # 64·16 + 16 + 16·10 + 10
    lines = result.output.splitlines()
    assert any(line.split()[:1] == ["4"] for line in lines)
    assert any(line.split()[:1] == ["64"] for line in lines)
    assert "threshold basis: 90 % absolute test accuracy" in result.output
    assert "d_int90 = " in result.output
    saved = json.loads(out.read_text())
    assert saved["dims"] == [4, 64] and saved["baseline_kind"] == "given"
    assert (tmp_path / "acc.png").stat().st_size > 0


def test_cli_reports_bad_input_without_a_traceback():
    runner = CliRunner()
    result = runner.invoke(app, ["intrinsic-dim", "--data", "digits", "--widths", "4",
                                 "--dims", "10", "--projection", "hadamard"])
    assert result.exit_code == 2 and "unknown projection 'hadamard'" in result.output
    result = runner.invoke(app, ["intrinsic-dim", "--data", "digits", "--widths", "4",
                                 "--dims", "10,100000"])
    assert result.exit_code == 2 and "only D = " in result.output
    result = runner.invoke(app, ["intrinsic-dim", "--data", "digits", "--dims", "ten"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_study_measurement_records_result_and_reports_the_threshold_line(tmp_path):
    config = config_from_dict({
        "name": "tiny",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 120, "dim": 4, "num_classes": 3}},
        "training": {"epochs": 1, "batch_size": 32},
        "models": [{"name": "a", "factory": "mlp",
                    "args": {"in_features": 4, "widths": [8], "out_features": 3}}],
        "measurements": [{"kind": "intrinsic_dimension", "dims": [2, 8, 30], "epochs": 2,
                          "search": "bisect", "lr": 0.05}],
    })
    run_study(config, tmp_path, progress=False)
    record = ResultStore(tmp_path).latest()["intrinsic_dimension"]
    result = record["result"]
    assert result["num_params"] == 4 * 8 + 8 + 8 * 3 + 3
    assert {2, 8, 30} <= set(result["dims"]) and result["projection"] == "fastfood"
    assert result["metric"] == "test accuracy" and "measured full-model" in result["basis"]
    html = (tmp_path / "report.html").read_text()
    assert 'id="intrinsic_dimension"' in html and "Threshold basis" in html
    assert "<svg" in html
