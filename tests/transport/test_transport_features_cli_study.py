"""Feature distances between networks, the convergence result, the CLI and the study."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from ridgeline.data import Dataset
from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.models import mlp
from ridgeline.transport import (
    FeatureDistance,
    SWConvergence,
    feature_distance,
    sliced_wasserstein,
    sliced_wasserstein_convergence,
)

F64 = torch.float64


@pytest.fixture
def two_mlps():
    torch.manual_seed(0)
    a = mlp(6, [16, 12], 3).double()
    torch.manual_seed(1)
    b = mlp(6, [16, 12], 3).double()
    inputs = torch.randn(90, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    return a, b, inputs


def test_feature_distance_equals_sw_of_the_layer_outputs(two_mlps):
    """The hooked representation is the output of the Sequential up to that module."""
    a, b, inputs = two_mlps
    result = feature_distance(a, b, inputs, layer="4", projections=40, seed=3,
                              control_variate="lower")
    with torch.no_grad():
        truth = sliced_wasserstein(a[:5](inputs), b[:5](inputs), projections=40, seed=3,
                                   control_variate="lower")
    assert isinstance(result, FeatureDistance)
    assert result.value == pytest.approx(float(truth), rel=1e-12)
    assert (result.dim_a, result.dim_b, result.num_examples) == (12, 12, 90)
    assert len(result.per_projection) == 40 and result.stderr > 0


def test_feature_distance_is_zero_where_two_models_agree(two_mlps):
    a, _, inputs = two_mlps
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[5].weight.add_(1.0)  # only the last layer differs
    assert feature_distance(a, b, inputs, layer="4").value == 0.0
    assert feature_distance(a, b, inputs, layer="5").value > 0.1


def test_feature_distance_accepts_every_data_form_and_restores_modes(two_mlps):
    a, b, inputs = two_mlps
    a.train()
    targets = torch.zeros(90, dtype=torch.long)
    forms = [inputs, (inputs, targets), Dataset(inputs, targets, 3, "toy"),
             DataLoader(TensorDataset(inputs, targets), batch_size=32)]
    values = [feature_distance(a, b, data, layer="2", projections=20, seed=0).value
              for data in forms]
    assert values == pytest.approx([values[0]] * 4, rel=1e-12)
    assert a.training and not any(not m.training for m in a.modules())
    assert feature_distance(a, b, inputs, layer="2", projections=20, seed=0,
                            batch_size=7).value == pytest.approx(values[0], rel=1e-12)


def test_feature_distance_errors_name_the_layers(two_mlps):
    a, b, inputs = two_mlps
    with pytest.raises(ConfigError, match="no module named 'fc9'.*'0', '1'"):
        feature_distance(a, b, inputs, layer="fc9")
    wide = mlp(6, [16, 20], 3).double()
    with pytest.raises(ShapeMismatchError, match="d=12.*d=20"):
        feature_distance(a, wide, inputs, layer="4")


def test_feature_distance_result_is_json_safe_and_plots(two_mlps):
    a, b, inputs = two_mlps
    result = feature_distance(a, b, inputs, layer="2", projections=30)
    assert json.loads(json.dumps(result.to_dict()))["layer"] == "2"
    assert result.plot() is not None


def test_convergence_reports_honest_spread_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=gen, dtype=F64)
    y = torch.randn(100, 6, generator=gen, dtype=F64) * 1.5 + torch.arange(6) / 3
    conv = sliced_wasserstein_convergence(x, y, projections=(10, 100), repeats=30, seed=1,
                                          name="toy")
    assert conv.projections == [10, 100] and conv.estimators == ["mc", "lower", "upper"]
    reference, ref_se = sliced_wasserstein(x, y, projections=20_000, seed=9, return_stderr=True,
                                           control_variate="lower")
    for est in conv.estimators:
        assert conv.std[est][1] < conv.std[est][0]
        tolerance = 5 * math.hypot(conv.std[est][1] / math.sqrt(30), float(ref_se))
        assert abs(conv.mean[est][1] - float(reference)) < tolerance
        assert 0.5 < conv.stderr[est][0] / conv.std[est][0] < 2
    assert conv.variance_reduction("lower", 100) > 1
    restored = SWConvergence.from_dict(json.loads(json.dumps(conv.to_dict())))
    assert restored == conv
    assert len(conv.rows()) == 2 and conv.plot() is not None
    with pytest.raises(ConfigError, match="p=2 only"):
        sliced_wasserstein_convergence(x, y, p=1)
    with pytest.raises(ConfigError, match="repeats"):
        sliced_wasserstein_convergence(x, y, repeats=1)


def test_sw_command_prints_estimate_and_error(tmp_path):
    from ridgeline.cli import app

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(80, 4)))
    np.save(tmp_path / "y.npy", rng.normal(size=(60, 4)) + 2)
    np.save(tmp_path / "z.npy", rng.normal(size=(60, 3)))
    runner = CliRunner()
    plain = runner.invoke(app, ["sw", str(tmp_path / "x.npy"), str(tmp_path / "y.npy")])
    assert plain.exit_code == 0, plain.output
    assert "SW_2 = " in plain.output and "±" in plain.output
    value = float(plain.output.split("=")[1].split("±")[0])
    truth = sliced_wasserstein(torch.from_numpy(np.load(tmp_path / "x.npy")),
                               torch.from_numpy(np.load(tmp_path / "y.npy")), projections=100,
                               seed=0)
    assert value == pytest.approx(float(truth), rel=1e-5)
    lower = runner.invoke(app, ["sw", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                                "--cv", "lower", "--projections", "500", "--seed", "3"])
    assert lower.exit_code == 0 and "lower control variate" in lower.output
    maxed = runner.invoke(app, ["sw", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--max"])
    assert maxed.exit_code == 0 and "max-SW_2" in maxed.output
    bad = runner.invoke(app, ["sw", str(tmp_path / "x.npy"), str(tmp_path / "z.npy")])
    assert bad.exit_code == 2 and "d=4" in bad.output
    missing = runner.invoke(app, ["sw", str(tmp_path / "nope.npy"), str(tmp_path / "y.npy")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    huge = runner.invoke(app, ["sw", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                               "-L", "100000000", "--memory-budget", "64MiB"])
    assert huge.exit_code == 2 and "memory_budget" in huge.output
    assert "projections=" in huge.output and "Traceback" not in huge.output


def test_transport_measurement_runs_in_a_study_and_reports(tmp_path):
    from ridgeline.study import ResultStore, config_from_dict, run_study

    config = config_from_dict({
        "name": "tiny-transport",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 160, "dim": 5,
                                                       "num_classes": 3}},
        "training": {"epochs": 1, "batch_size": 32},
        "models": [{"name": name, "factory": "mlp", "init_seed": seed,
                    "args": {"in_features": 5, "widths": [8, 8], "out_features": 3}}
                   for name, seed in (("a", 1), ("b", 2))],
        "measurements": [{"kind": "transport", "projections": [5, 20], "repeats": 3}],
    })
    run_study(config, tmp_path, progress=False)
    record = ResultStore(tmp_path).latest()["transport"]
    result = record["result"]
    assert result["layer"] == "4"
    features = SWConvergence.from_dict(result["features"])
    assert features.projections == [5, 20] and features.repeats == 3
    assert result["features_init"]["value"] > 0
    report = (tmp_path / "report.html").read_text()
    assert "lower CV" in report and "<svg" in report
