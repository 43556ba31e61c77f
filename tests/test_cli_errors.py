"""Bad command-line input: one red line (exit 2, no traceback) with a fix, found before any
expensive work; -q after the command; warnings as one clean line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ridgeline
from ridgeline.cli import app
from ridgeline.errors import ConfigError, DataError, ShapeMismatchError
from ridgeline.models import mlp

runner = CliRunner()


def _refused(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and output.count("error:") == 1, output
    for needle in needles:
        assert needle in output, output
    return output


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive step fail loudly: a refusal must come before them."""
    from importlib import import_module

    def boom(*args, **kwargs):
        raise AssertionError("expensive work started before the input was checked")

    for module, name in (("ridgeline.train", "train"), ("ridgeline.curvature", "top_eigenvalues"),
                         ("ridgeline.kernels", "empirical_ntk"),
                         ("ridgeline.connectivity", "interpolate"),
                         ("ridgeline.subspace.intrinsic", "intrinsic_dimension")):
        monkeypatch.setattr(import_module(module), name, boom)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.normal(size=(40, 6)).astype("float32"), y=rng.integers(0, 3, 40))
    return str(path)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return str(ridgeline.save(mlp(6, [5], 3), tmp_path / "m.safetensors"))


# ----------------------------------------------------------------------------- train
def test_train_refuses_bad_arguments_before_training(tmp_path, data, no_work):
    out = str(tmp_path / "m.safetensors")
    base = ["train", "--data", data, "--out", out]
    folder = tmp_path / "existing"
    folder.mkdir()
    _refused(["train", "--data", data, "--out", str(folder)], "is a folder", "model.safetensors")
    _refused(base + ["--lr", "-1"], "lr must be a finite number ≥ 0, got -1")
    _refused(base + ["--momentum", "1.5"], "momentum")
    _refused(base + ["--batch-size", "0"], "batch_size")
    _refused(base + ["--widths", "abc"], "--widths must be comma-separated integers")
    _refused(base + ["--widths", "8,-2"], "--widths values must be ≥ 1")
    _refused(base + ["--option", "rho"], "--option takes KEY=VALUE, got 'rho'")
    _refused(base + ["--model-args", "[1]"], "--model-args must be a JSON object")
    _refused(["train", "--data", data, "--out", str(tmp_path / "m.pt")], "m.safetensors")
    _refused(["train", "--data", str(tmp_path / "missing.npz"), "--out", out],
             "missing.npz: the file does not exist")
    np.savez(tmp_path / "nox.npz", inputs=np.zeros((4, 2)), y=np.zeros(4))
    _refused(["train", "--data", str(tmp_path / "nox.npz"), "--out", out],
             "must hold arrays named 'x' (inputs) and 'y' (targets); it holds ['inputs', 'y']")
    _refused(base + ["--model", "nowhere_pkg.nets:make"], "nowhere_pkg", "PYTHONPATH")
    assert not (tmp_path / "m.safetensors").exists()


def test_training_data_is_validated_in_every_example():
    net = mlp(3, [4], 2)
    x, y = torch.full((100, 3), float("nan")), torch.zeros(100, dtype=torch.long)
    with pytest.raises(DataError, match="in 100 examples"):
        ridgeline.train(net, (x, y), epochs=1, progress=False)
    good = torch.randn(100, 3)
    y_out_of_range = torch.zeros(100, dtype=torch.long)
    y_out_of_range[-1] = 5  # only the last example is bad
    with pytest.raises(DataError, match=r"\[0, 5\]"):
        ridgeline.train(net, (good, y_out_of_range), epochs=1, progress=False)
    with pytest.raises(DataError, match="eval_data"):
        ridgeline.train(net, (good, y), eval_data=(x, y), epochs=1, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        ridgeline.train(net, (good, y), lr=-0.1, epochs=1, progress=False)


# ----------------------------------------------------------------------------- instruments
def test_instrument_commands_refuse_bad_paths_and_subsets_before_work(tmp_path, data, checkpoint,
                                                                      no_work):
    d = ["--data", data]
    _refused(["curvature", checkpoint, *d, "--subset", "0"], "--subset must be a positive",
             "leave it out to use every example")
    _refused(["curvature", checkpoint, *d, "--subset", "-5"], "got -5")
    _refused(["curvature", checkpoint, *d, "--density", "--plot", str(tmp_path / "no" / "p.png")],
             "does not exist", "mkdir -p")
    _refused(["curvature", checkpoint, *d, "--density", "--plot", str(tmp_path / "p.xyz")],
             "cannot write a .xyz image", ".png")
    _refused(["curvature", checkpoint, *d, "--plot", str(tmp_path / "p.png")], "add --density")
    _refused(["ntk", checkpoint, *d, "--plot", str(tmp_path / "p.nope")], ".nope")
    _refused(["connect", checkpoint, checkpoint, *d, "--plot", str(tmp_path / "x" / "p.png")],
             "does not exist")
    _refused(["intrinsic-dim", *d, "--plot", str(tmp_path / "p.txt")], ".txt")
    _refused(["intrinsic-dim", *d, "--json", str(tmp_path / "x" / "r.json")], "--json")
    _refused(["fwdgrad", checkpoint, *d, "--json", str(tmp_path / "x" / "r.json")], "--json")
    _refused(["curvature", checkpoint, "--data", data, "--data-args", '{"n": 3}'], "--data-args")


def test_ntk_refuses_labels_out_of_range_like_curvature(tmp_path, checkpoint, no_work):
    np.savez(tmp_path / "labels.npz", x=np.zeros((20, 6), dtype="float32"), y=np.arange(20))
    for command in (["ntk", checkpoint, "--n", "20"], ["curvature", checkpoint]):
        _refused(command + ["--data", str(tmp_path / "labels.npz")],
                 "labels range over [0, 19] but the model has 3 outputs")


def test_a_sidecar_with_bad_arguments_is_one_line(tmp_path, data, checkpoint):
    sidecar = tmp_path / "m.safetensors.json"
    info = json.loads(sidecar.read_text())
    info["architecture"]["kwargs"]["widths"] = "abc"
    sidecar.write_text(json.dumps(info))
    _refused(["curvature", checkpoint, "--data", data], "cannot rebuild the model", "--model")


def test_hvp_with_a_wrong_size_vector_is_a_shape_error_and_flat_vectors_work():
    torch.manual_seed(0)
    net = mlp(3, [4], 2).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    objective = ridgeline.Objective(net, (x, y))
    P = objective.num_params
    with pytest.raises(ShapeMismatchError, match=f"length {P}"):
        objective.hvp(torch.randn(P + 1, dtype=torch.float64))
    with pytest.raises(ShapeMismatchError, match="missing"):
        objective.hvp({"1.weight": torch.randn(4, 3, dtype=torch.float64)})
    with pytest.raises(ShapeMismatchError, match=r"'1.weight' has shape \(3,\)"):
        objective.hvp({k: torch.zeros(3 if k == "1.weight" else p.shape, dtype=torch.float64)
                       for k, p in objective.params().items()})
    # ground truth: the explicit Hessian times v
    v = torch.randn(P, dtype=torch.float64)
    flat = ridgeline.flatten(objective.params())
    hessian = torch.autograd.functional.hessian(
        lambda t: objective.batch_loss(ridgeline.unflatten(t, objective.params()), x, y), flat)
    got = ridgeline.flatten(objective.hvp(v))
    assert torch.allclose(got, hessian @ v, atol=1e-10)
    by_name = objective.hvp(ridgeline.unflatten(v, objective.params()))
    assert torch.allclose(ridgeline.flatten(by_name), got, atol=1e-12)


# ----------------------------------------------------------------------------- -q and warnings
def test_quiet_is_accepted_after_the_command(tmp_path, data, monkeypatch):
    import os
    from importlib import import_module

    train_module = import_module("ridgeline.train")
    seen = {}

    def fake_train(*args, progress=True, **kwargs):
        seen["progress"] = progress
        raise ConfigError("stop here")

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.delenv("RIDGELINE_QUIET", raising=False)
    out = str(tmp_path / "m.safetensors")
    for flags in (["train", "-q"], ["-q", "train"], ["train", "--quiet"]):
        seen.clear()
        result = runner.invoke(app, flags + ["--data", data, "--out", out, "--epochs", "1"])
        assert result.exit_code == 2 and "stop here" in result.output
        assert seen["progress"] is False, flags
        assert "RIDGELINE_QUIET" not in os.environ  # restored after the command
    runner.invoke(app, ["train", "--data", data, "--out", out])
    assert seen["progress"] is True
    # the quiet flag reaches every command, e.g. study and report
    assert runner.invoke(app, ["report", str(tmp_path), "-q"]).exit_code == 2


def test_warnings_reach_the_user_as_one_clean_line(tmp_path, data, monkeypatch):
    from importlib import import_module

    train_module = import_module("ridgeline.train")

    def warning_train(*args, **kwargs):
        warnings.warn("the auxiliary heads cost 20 %\nof the network", UserWarning, stacklevel=1)
        raise ConfigError("stop here")

    monkeypatch.setattr(train_module, "train", warning_train)
    result = runner.invoke(app, ["train", "--data", data, "--out", str(tmp_path / "m.safetensors")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "warning: the auxiliary heads cost 20 % of the network" in lines
    assert "UserWarning" not in result.output and "warnings.warn" not in result.output
    assert warnings.showwarning.__name__ != "warning_line"  # restored after the command
