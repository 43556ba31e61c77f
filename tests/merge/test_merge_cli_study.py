"""`ridgeline merge` and the study measurement `merge`."""

from __future__ import annotations

import numpy as np
import torch
from typer.testing import CliRunner

import ridgeline
from ridgeline.cli import app
from ridgeline.merge import merge
from ridgeline.models import mlp
from ridgeline.study import config_from_dict, run_study


def test_merge_command_writes_the_merged_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=gen)
    y = torch.randint(0, 3, (60,), generator=gen)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    paths, models = [], []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = mlp(6, [12], 3)
        ridgeline.train(model, (x, y), epochs=2, batch_size=20, seed=seed, progress=False)
        models.append(model)
        paths.append(str(ridgeline.save(model, tmp_path / f"m{seed}.safetensors")))
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(app, ["--quiet", "merge", *paths, "--method", "fisher",
                                      "--align", "weights", "--data", str(tmp_path / "data.npz"),
                                      "--out", str(out), "--predict"])
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and "planner: predicted" in result.output
    loaded = ridgeline.load(out)
    expected = merge(models, method="fisher", align="weights", data=(x, y)).model
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    bad = CliRunner().invoke(app, ["merge", *paths, "--method", "ties",
                                   "--data", str(tmp_path / "data.npz")])
    assert bad.exit_code == 2 and "base" in bad.output
    bad = CliRunner().invoke(app, ["merge", *paths, "--weights", "1,-1,1",
                                   "--data", str(tmp_path / "data.npz")])
    assert bad.exit_code == 2 and "non-negative" in bad.output
    bad = CliRunner().invoke(app, ["merge", *paths, "--align", "weights", "--matching", "bias",
                                   "--data", str(tmp_path / "data.npz")])
    assert bad.exit_code == 2 and "matching" in bad.output
    # the CLI passes --matching and --depth-weight through: same merge as the API
    result = CliRunner().invoke(app, ["--quiet", "merge", *paths, "--align", "weights",
                                      "--matching", "all", "--depth-weight", "2",
                                      "--data", str(tmp_path / "data.npz"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = merge(models, align="weights", matching="all", depth_weight=2.0).model
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(ridgeline.load(out).state_dict()[k], v)


def test_merge_measurement_runs_in_a_tiny_study_and_reports(tmp_path):
    config = config_from_dict({
        "name": "tiny",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 150, "dim": 5, "num_classes": 3}},
        "training": {"epochs": 2, "batch_size": 32},
        "models": [{"name": n, "factory": "mlp", "init_seed": s, "training": {"seed": s},
                    "args": {"in_features": 5, "widths": [12], "out_features": 3}}
                   for n, s in (("a", 1), ("b", 2), ("c", 1))],
        "measurements": [{"kind": "merge", "models": ["a", "b", "c"], "base": "init:a",
                          "methods": ["average", "fisher", "ties"], "subset": 60,
                          "restarts": 2}],
    })
    outcome = run_study(config, tmp_path, progress=False)
    assert "merge" in outcome.ran
    text = (tmp_path / "report.html").read_text()
    for needle in ("models (grey) and their merges (blue)", "planner: Spearman", "ties + weights"):
        assert needle in text, needle
    from ridgeline.study import ResultStore

    candidates = ResultStore(tmp_path).latest()["merge"]["result"]["candidates"]
    used = {c["label"]: (c.get("details") or {}).get("restarts") for c in candidates}
    assert used["ties + weights"] == 2 and used["average"] is None, used  # as configured


def test_merge_command_refuses_bad_input_before_work_and_reads_plain_state_dicts(tmp_path,
                                                                                 monkeypatch):
    gen = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", x=torch.randn(30, 6, generator=gen).numpy(),
             y=torch.randint(0, 3, (30,), generator=gen).numpy())
    data = ["--data", str(tmp_path / "d.npz")]
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}.pt"
        torch.save(mlp(6, [5], 3).state_dict(), path)
        paths.append(str(path))
    model = ["--model", "mlp", "--model-args",
             '{"in_features": 6, "widths": [5], "out_features": 3}']
    ok = CliRunner().invoke(app, ["-q", "merge", *paths, *model, *data, "--align", "weights"])
    assert ok.exit_code == 0, ok.output
    import ridgeline.merge as package

    def boom(*args, **kwargs):
        raise AssertionError("merging started before the input was checked")

    monkeypatch.setattr(package, "merge", boom)
    for args, needle in ((["--out", str(tmp_path / "no" / "m.safetensors")], "does not exist"),
                         (["--out", str(tmp_path / "m.pt")], ".safetensors"),
                         (["--method", "median"], "--method"),
                         (["--align", "kernels"], "--align"),
                         (["--weights", "1,x"], "--weights"),
                         (["--subset", "0"], "--subset")):
        bad = CliRunner().invoke(app, ["merge", *paths, *model, *data, *args])
        assert bad.exit_code == 2 and needle in bad.output, (args, bad.output)
        assert "Traceback" not in bad.output


def test_merge_measurement_options_are_checked_before_any_work():
    import pytest

    from ridgeline.errors import ConfigError
    from ridgeline.study.validate import validate_study

    config = config_from_dict({
        "name": "tiny",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 60, "dim": 5, "num_classes": 3}},
        "models": [{"name": n, "factory": "mlp", "init_seed": s,
                    "args": {"in_features": 5, "widths": [4], "out_features": 3}}
                   for n, s in (("a", 1), ("b", 2))],
        "measurements": [{"kind": "merge", "methods": ["average", "median", "ties"],
                          "align": ["none", "weight"], "density": 1.5},
                         {"kind": "merge", "id": "merge-2", "base": "init:z", "models": ["a"]}],
    })
    with pytest.raises(ConfigError) as info:
        validate_study(config)
    message = str(info.value)
    for needle in ("methods ['median'] are unknown", "align entries ['weight']",
                   "methods ['ties'] merge task vectors and need base",
                   "density must lie in (0, 1]", "base 'init:z' names no study model"):
        assert needle in message, message
