"""``restarts`` of weight matching from the command line (``connect``, ``merge``) and from a
study config (``connectivity``, ``barrier_prediction``, ``merge``): it reaches the library,
bad values are refused before any work, and a changed value redoes the record on resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ridgeline
import ridgeline.connectivity.alignment as alignment
import ridgeline.connectivity.heads as heads
from ridgeline.cli import app
from ridgeline.errors import ConfigError
from ridgeline.merge import merge
from ridgeline.models import mlp
from ridgeline.study import ResultStore, config_from_dict, run_study
from ridgeline.study.runner import planned_measurements
from ridgeline.study.validate import validate_study

runner = CliRunner()


@pytest.fixture
def descents(monkeypatch):
    """Spy on weight matching: the ``restarts`` align asks for (the first, outer call) and the
    kicks of iterated local search (one per restart after the first run)."""
    calls = {"restarts": [], "kicks": 0}
    matching, kick = alignment.weight_matching, heads.kick

    def spy_matching(*args, **kwargs):
        calls["restarts"].append(kwargs.get("restarts"))
        return matching(*args, **kwargs)

    def spy_kick(*args, **kwargs):
        calls["kicks"] += 1
        return kick(*args, **kwargs)

    monkeypatch.setattr(alignment, "weight_matching", spy_matching)
    monkeypatch.setattr(heads, "kick", spy_kick)
    import ridgeline.merge.alignment as merge_alignment

    monkeypatch.setattr(merge_alignment, "weight_matching", spy_matching)
    return calls


@pytest.fixture
def two_mlps(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=gen)
    y = torch.randint(0, 3, (60,), generator=gen)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    paths, models = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = mlp(6, [12, 12], 3)
        ridgeline.train(model, (x, y), epochs=2, batch_size=20, seed=seed, progress=False)
        models.append(model)
        paths.append(str(ridgeline.save(model, tmp_path / f"m{seed}.safetensors")))
    return paths, models, ["--data", str(tmp_path / "data.npz")]


def test_connect_restarts_sets_the_number_of_weight_matching_runs(two_mlps, descents):
    """Iterated local search kicks once per run after the first: --restarts 4 gives three
    kicks; without the option an MLP gets Git Re-Basin's single descent (no kick)."""
    paths, _, data = two_mlps
    base = ["--quiet", "connect", *paths, *data, "--align", "weights", "--points", "3"]
    result = runner.invoke(app, base + ["--restarts", "4"])
    assert result.exit_code == 0, result.output
    assert descents["restarts"][0] == 4 and descents["kicks"] == 3
    assert "the best of up to 4 runs" in result.output
    descents["restarts"].clear()
    descents["kicks"] = 0
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert descents["restarts"] == [None] and descents["kicks"] == 0
    assert "(one run)" in result.output


def test_merge_restarts_reaches_weight_matching_and_gives_the_api_merge(two_mlps, tmp_path,
                                                                        descents):
    paths, models, data = two_mlps
    out = tmp_path / "merged.safetensors"
    result = runner.invoke(app, ["--quiet", "merge", *paths, *data, "--align", "weights",
                                 "--restarts", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert descents["restarts"][0] == 3 and descents["kicks"] == 2
    assert "weight matching: the best of up to 3 runs per model" in result.output
    expected = merge(models, align="weights", restarts=3)
    assert expected.details["restarts"] == 3
    for k, v in expected.model.state_dict().items():
        torch.testing.assert_close(ridgeline.load(out).state_dict()[k], v)
    assert merge(models, align="weights").details["restarts"] == 1  # an MLP's default


@pytest.mark.parametrize("command", ["connect", "merge"])
def test_bad_restarts_are_one_line_before_any_work(two_mlps, monkeypatch, command):
    paths, _, data = two_mlps

    def boom(*args, **kwargs):
        raise AssertionError("work started before --restarts was checked")

    monkeypatch.setattr("ridgeline.cli_options.load_model", boom)
    for args, needle in ((["--align", "weights", "--restarts", "0"],
                          "--restarts must be an integer ≥ 1"),
                         (["--align", "weights", "--restarts", "-2"], "got -2"),
                         (["--align", "activations", "--restarts", "2"],
                          "--restarts applies to weight matching only; add --align weights"),
                         (["--restarts", "2"], "(got no --align)")):
        result = runner.invoke(app, [command, *paths, *data, *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and result.output.count("error:") == 1
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert needle in result.output, result.output
    assert runner.invoke(app, [command, *paths, *data, "--align", "weights",
                               "--restarts", "many"]).exit_code == 2


def test_merge_api_refuses_bad_restarts():
    models = [mlp(3, [4], 2), mlp(3, [4], 2)]
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="restarts must be an integer ≥ 1"):
            merge(models, align="weights", restarts=bad)


# ----------------------------------------------------------------------------- study
def _study(measurements: list[dict]) -> dict:
    return {
        "name": "tiny-restarts",
        "data": {"name": "gaussian_mixture",
                 "args": {"num_samples": 90, "dim": 5, "num_classes": 3}},
        "training": {"epochs": 1, "batch_size": 30},
        "models": [{"name": n, "factory": "mlp", "init_seed": s, "training": {"seed": s},
                    "args": {"in_features": 5, "widths": [10, 10], "out_features": 3}}
                   for n, s in (("a", 1), ("b", 2))],
        "measurements": measurements,
    }


def test_study_validation_names_a_bad_restarts(tmp_path):
    config = config_from_dict(_study([
        {"kind": "connectivity", "restarts": 0},
        {"kind": "barrier_prediction", "align": "weights", "restarts": 2.5},
        {"kind": "merge", "id": "merge-bool", "restarts": True},
        {"kind": "connectivity", "id": "acts", "align": ["activations"], "restarts": 4},
        {"kind": "barrier_prediction", "id": "unaligned", "restarts": 4},
        {"kind": "merge", "id": "merge-none", "align": ["none"], "restarts": 4},
    ]))
    with pytest.raises(ConfigError) as info:
        validate_study(config)
    message = str(info.value)
    assert "6 problems" in message, message
    assert "measurement 'connectivity' (kind 'connectivity'): 'restarts': Value error, " \
           "restarts must be an integer ≥ 1 (runs of weight matching; 1 is a single descent), " \
           "got 0" in message, message
    assert "'restarts': Value error, restarts must be an integer ≥ 1" in message
    assert "got 2.5" in message and "got True" in message
    for where in ("measurements[3] ('acts')", "measurements[4] ('unaligned')",
                  "measurements[5] ('merge-none')"):
        assert f"{where}: restarts = 4 applies to weight matching only" in message, message
    assert not (tmp_path / "tiny-restarts").exists()


def test_a_changed_restarts_redoes_the_record_on_resume(tmp_path, descents):
    def config(restarts):
        entry = {"kind": "connectivity", "points": 3, "splits": ["train"],
                 "align": ["weights"], "layerwise": False}
        if restarts is not None:
            entry["restarts"] = restarts
        return config_from_dict(_study([entry]))

    first = run_study(config(2), tmp_path, progress=False, report=False)
    assert "connectivity" in first.ran and descents["kicks"] == 1
    record = ResultStore(tmp_path).latest()["connectivity"]
    assert record["options"]["restarts"] == 2
    assert record["result"]["alignment"]["weights"]["restarts"] == 2
    again = run_study(config(2), tmp_path, progress=False, report=False)
    assert again.ran == [] and "connectivity" in again.skipped and descents["kicks"] == 1
    changed = run_study(config(3), tmp_path, progress=False, report=False)
    assert changed.ran == ["connectivity"] and descents["kicks"] == 1 + 2
    record = ResultStore(tmp_path).latest()["connectivity"]
    assert record["result"]["alignment"]["weights"]["restarts"] == 3
    default = run_study(config(None), tmp_path, progress=False, report=False)
    assert default.ran == ["connectivity"]  # None is another setting: the library's default
    record = ResultStore(tmp_path).latest()["connectivity"]
    assert record["options"]["restarts"] is None
    assert record["result"]["alignment"]["weights"]["restarts"] == 1  # an MLP's default


def test_the_fingerprint_of_a_default_restarts_follows_the_library_default(monkeypatch):
    """restarts left out means the library's default for transformers, which has changed
    between versions: a record made under another default must not be reused. An explicit
    value, and measurements without restarts, keep their fingerprints."""
    config = config_from_dict(_study([
        {"kind": "connectivity"}, {"kind": "connectivity", "id": "explicit", "restarts": 8},
        {"kind": "slice"}]))
    before = {p.id: p.fingerprint for p in planned_measurements(config)}
    monkeypatch.setattr(heads, "STRUCTURED_RESTARTS", heads.STRUCTURED_RESTARTS + 1)
    after = {p.id: p.fingerprint for p in planned_measurements(config)}
    assert before["connectivity"] != after["connectivity"]
    assert {k: v for k, v in before.items() if k != "connectivity"} == \
        {k: v for k, v in after.items() if k != "connectivity"}
