"""`ridgeline connect` and the connectivity, slice and barrier_prediction measurements."""

from __future__ import annotations

import numpy as np
import torch
from typer.testing import CliRunner

import ridgeline
from ridgeline.cli import app
from ridgeline.models import mlp
from ridgeline.study import config_from_dict, run_study


def test_connect_prints_naive_and_aligned_barriers(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=gen)
    y = torch.randint(0, 3, (60,), generator=gen)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = mlp(6, [12], 3)
        ridgeline.train(model, (x, y), epochs=3, batch_size=20, seed=seed, progress=False)
        paths.append(str(ridgeline.save(model, tmp_path / f"m{seed}.safetensors")))
    plot = tmp_path / "path.png"
    result = CliRunner().invoke(app, ["--quiet", "connect", *paths, "--data", str(tmp_path / "data.npz"),
                                      "--align", "weights", "--points", "5", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "naive" in result.output and "aligned (weights)" in result.output
    assert "removes" in result.output
    assert "computes B's function: max |f_B(x) − f_πB(x)| =" in result.output
    assert plot.exists()
    bad = CliRunner().invoke(app, ["connect", *paths, "--data", str(tmp_path / "data.npz"),
                                   "--align", "nonsense"])
    assert bad.exit_code == 2 and "weights" in bad.output


def test_measurements_run_in_a_tiny_study_and_report(tmp_path):
    config = config_from_dict({
        "name": "tiny",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 150, "dim": 5, "num_classes": 3}},
        "training": {"epochs": 2, "batch_size": 32},
        "models": [{"name": n, "factory": "mlp", "init_seed": s, "training": {"seed": s},
                    "args": {"in_features": 5, "widths": [12], "out_features": 3}}
                   for n, s in (("a", 1), ("b", 2))],
        "measurements": [
            {"kind": "connectivity", "points": 5, "layerwise_points": 3},
            {"kind": "slice", "points": 4, "subset": 50},
            {"kind": "barrier_prediction", "points": 5, "layers": "tensor"},
            {"kind": "barrier_prediction", "id": "aligned", "points": 3, "align": "weights",
             "restarts": 2},
        ],
    })
    outcome = run_study(config, tmp_path, progress=False)
    assert {"connectivity", "slice", "barrier_prediction", "aligned"} <= set(outcome.ran)
    from ridgeline.study import ResultStore

    latest = ResultStore(tmp_path).latest()
    assert latest["aligned"]["result"]["restarts"] == 2  # the runs weight matching made
    assert latest["connectivity"]["result"]["alignment"]["weights"]["restarts"] == 1  # MLP
    text = (tmp_path / "report.html").read_text()
    for needle in ("loss along (1−α)θA + αθB", "layer-wise barriers", "loss landscape",
                   "Spearman"):
        assert needle in text, needle


def test_connectivity_measurement_aligns_a_transformer_pair_and_reports(tmp_path):
    """The default study's transformer pair, shrunk: aligned paths, layer-wise barriers and
    the function-preservation numbers in the report's data."""
    config = config_from_dict({
        "name": "tiny-transformers",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 120, "dim": 8, "num_classes": 3}},
        "training": {"epochs": 1, "batch_size": 40},
        "models": [{"name": n, "factory": "transformer", "init_seed": s, "training": {"seed": s},
                    "args": {"in_features": 8, "out_features": 3, "patch": 2, "width": 8,
                             "depth": 1, "heads": 2}}
                   for n, s in (("t1", 1), ("t2", 2))],
        "measurements": [{"kind": "connectivity", "points": 3, "layerwise_points": 3,
                          "models": ["t1", "t2"],
                          "align": ["weights", "activations"]}],
    })
    outcome = run_study(config, tmp_path, progress=False)
    assert "connectivity" in outcome.ran
    text = (tmp_path / "report.html").read_text()
    assert "aligned (weights)" in text and "aligned (activations)" in text
    assert "layer-wise barriers" in text and "max |f_B − f_πB|" in text
    from ridgeline.connectivity.heads import STRUCTURED_RESTARTS
    from ridgeline.study import ResultStore

    record = ResultStore(tmp_path).latest()["connectivity"]  # the runs the default made
    assert record["result"]["alignment"]["weights"]["restarts"] == STRUCTURED_RESTARTS
