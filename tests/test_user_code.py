"""User code: model factories and data functions named "package.module:callable", in Python,
on the command line and in studies. The user package is written to tmp_path (conftest)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ridgeline
from ridgeline.cli import app
from ridgeline.data import load_dataset
from ridgeline.errors import ConfigError, DataError
from ridgeline.models import build_model
from ridgeline.usercode import resolve_callable

runner = CliRunner()
SRC = Path(ridgeline.__file__).parent.parent


# ----------------------------------------------------------------------------- resolver
def test_resolver_errors_name_the_module_and_attribute(user_package):
    with pytest.raises(ConfigError, match="package.module:callable"):
        resolve_callable("rl_userpkg.nets.make")
    with pytest.raises(ConfigError, match=r"no module named 'rl_nowhere'.*PYTHONPATH"):
        resolve_callable("rl_nowhere.nets:make")
    with pytest.raises(ConfigError, match=r"'rl_userpkg.nets' has no attribute 'mak'.*'make'"):
        resolve_callable("rl_userpkg.nets:mak")
    with pytest.raises(ConfigError, match="NOT_CALLABLE is a int, not a function"):
        resolve_callable("rl_userpkg.nets:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="broken on purpose"):
        resolve_callable("rl_userpkg.broken:anything")
    assert resolve_callable("rl_userpkg.nets:make").__name__ == "make"


def test_a_factory_with_wrong_arguments_shows_its_signature(user_package):
    with pytest.raises(ConfigError) as info:
        build_model("rl_userpkg.nets:make", widht=3)
    assert "widht" in str(info.value)
    assert "make(in_features=12, width=8, out_features=3)" in str(info.value)
    with pytest.raises(ConfigError, match="must return a torch.nn.Module"):
        build_model("rl_userpkg.nets:not_a_module")
    with pytest.raises(ConfigError, match=r"mlp\(in_features"):
        build_model("mlp", in_features=3, widht=[4], out_features=2)


def test_a_user_factory_builds_the_model_and_records_it(user_package):
    torch.manual_seed(0)
    net = build_model("rl_userpkg.nets:make", in_features=4, width=5, out_features=2)
    assert isinstance(net, torch.nn.Sequential) and net[0].weight.shape == (5, 4)
    assert net.ridgeline_architecture == {"factory": "rl_userpkg.nets:make",
                                          "kwargs": {"in_features": 4, "width": 5,
                                                     "out_features": 2}}


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("function", ["load", "loader", "examples"])
def test_user_data_in_every_form_gives_the_same_tensors(user_package, function):
    from rl_userpkg.data import load  # the ground truth: the user's own tensors

    for split in ("train", "test"):
        data = load_dataset(f"rl_userpkg.data:{function}", split)
        x, y = load(split)
        assert torch.equal(data.inputs, x) and torch.equal(data.targets, y)
        assert data.num_classes == int(y.max()) + 1
    assert not torch.equal(load_dataset("rl_userpkg.data:load", "train").inputs,
                           load_dataset("rl_userpkg.data:load", "test").inputs)
    assert len(load_dataset("rl_userpkg.data:load", "train", n=7)) == 7


def test_user_data_errors(user_package):
    with pytest.raises(DataError, match="returned str"):
        load_dataset("rl_userpkg.data:wrong")
    with pytest.raises(ConfigError, match=r"split='train'.*no_split\(n=4\)"):
        load_dataset("rl_userpkg.data:no_split")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("nope")


def test_factories_and_data_are_checked_without_running_them(user_package, tmp_path):
    from ridgeline.data import check_dataset
    from ridgeline.models import check_model

    check_model("rl_userpkg.nets:make", width=3)
    check_model("mlp", in_features=3, widths=[4], out_features=2)
    check_dataset("rl_userpkg.data:load", n=5)
    check_dataset("gaussian_mixture", num_samples=10)
    with pytest.raises(ConfigError, match=r"make\(in_features=12"):
        check_model("rl_userpkg.nets:make", depth=3)
    with pytest.raises(ConfigError, match="unknown model"):
        check_model("nope")
    with pytest.raises(ConfigError, match=r"no_split\(n=4\)"):
        check_dataset("rl_userpkg.data:no_split")
    with pytest.raises(ConfigError, match="rl_userpkg.broken"):
        check_dataset("rl_userpkg.broken:load")
    with pytest.raises(ConfigError, match="gaussian_mixture"):
        check_dataset("gaussian_mixture", bogus=1)


# ----------------------------------------------------------------------------- CLI
def _explicit_top_eigenvalues(net: torch.nn.Module, x, y, k: int) -> list[float]:
    """Ground truth: eigenvalues of the Hessian built column by column with autograd."""
    from torch.func import functional_call

    params = {n: p.detach() for n, p in net.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()]).double()

    def loss(theta):
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            n = int(torch.tensor(shape).prod())
            parts[name] = theta[i:i + n].reshape(shape)
            i += n
        out = functional_call(net.double(), parts, (x.double(),))
        return torch.nn.functional.cross_entropy(out, y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    return torch.linalg.eigvalsh(hessian).flip(0)[:k].tolist()


def test_cli_curvature_on_a_plain_state_dict_with_user_code_matches_the_explicit_hessian(
        tmp_path, user_package):
    """`ridgeline curvature a.pt --model mypkg.nets:make --data mypkg.data:load --k 2`, run as
    a user would: a separate process with the package on PYTHONPATH."""
    from rl_userpkg.data import load
    from rl_userpkg.nets import make

    torch.manual_seed(0)
    net = make()
    torch.save(net.state_dict(), tmp_path / "a.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(user_package)]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ridgeline", "curvature", str(tmp_path / "a.pt"),
                           "--model", "rl_userpkg.nets:make", "--data", "rl_userpkg.data:load",
                           "--k", "2", "--tol", "1e-6", "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = [float(re.search(rf"λ{i}\s*│\s*([-0-9.e+]+)", done.stdout).group(1))
               for i in (1, 2)]
    truth = _explicit_top_eigenvalues(net, *load("train"), k=2)
    assert printed == pytest.approx(truth, rel=1e-4)


def test_cli_needs_the_model_for_a_plain_state_dict(tmp_path, user_package):
    from rl_userpkg.nets import make

    torch.save(make().state_dict(), tmp_path / "a.pt")
    base = ["curvature", str(tmp_path / "a.pt"), "--data", "rl_userpkg.data:load", "--k", "1"]
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "--model" in result.output
    result = runner.invoke(app, base + ["--model", "rl_userpkg.nets:make", "--model-args",
                                        '{"width": 4}'])
    assert result.exit_code == 2
    assert "'0.weight' has shape (8, 12) in the checkpoint" in result.output
    result = runner.invoke(app, base + ["--model", "rl_userpkg.nets:make", "--model-args", "{oops"])
    assert result.exit_code == 2 and "--model-args must be a JSON object" in result.output
    assert "Traceback" not in result.output


def test_cli_train_then_every_checkpoint_command_with_user_code(tmp_path, user_package):
    out = tmp_path / "u.safetensors"
    result = runner.invoke(app, ["train", "--out", str(out), "--model", "rl_userpkg.nets:make",
                                 "--model-args", '{"width": 6}', "--data", "rl_userpkg.data:loader",
                                 "--epochs", "1", "--batch-size", "16", "-q"])
    assert result.exit_code == 0, result.output
    assert ridgeline.load(out)[0].weight.shape == (6, 12)  # rebuilt from the recorded factory
    data = ["--data", "rl_userpkg.data:load"]
    for args in (["ntk", str(out), "--n", "16"], ["connect", str(out), str(out), "--points", "3"],
                 ["fwdgrad", str(out), "--repeats", "2"]):
        result = runner.invoke(app, args + data)
        assert result.exit_code == 0, (args, result.output)


# ----------------------------------------------------------------------------- studies
STUDY = """
name = "user-code"
[data]
name = "rl_userpkg.data:load"
args = { n = 48 }
[training]
epochs = 2
batch_size = 16
[[models]]
name = "a"
factory = "rl_userpkg.nets:make"
args = { width = 6 }
init_seed = 1
[[models]]
name = "b"
factory = "rl_userpkg.nets:make"
args = { width = 6 }
init_seed = 2
"""

QUICK_MEASUREMENTS = """
[[measurements]]
kind = "connectivity"
points = 5
splits = ["test"]
align = ["weights"]
layerwise = false
[[measurements]]
kind = "curvature"
k = 2
trace = false
density = false
sharpness = false
overlap_k = 0
[[measurements]]
kind = "ntk"
[[measurements]]
kind = "transport"
classes = [0, 1]
projections = [10, 30]
repeats = 3
"""

ALL_MEASUREMENTS = QUICK_MEASUREMENTS + """
[[measurements]]
kind = "barrier_prediction"
[[measurements]]
kind = "slice"
points = 5
[[measurements]]
kind = "forward_gradient"
model = "a"
guesses = ["random", "local"]
repeats = 2
fit_epochs = 1
train_epochs = 1
train_guesses = ["random"]
[[measurements]]
kind = "sharpness_aware"
model = "a"
epochs = 1
[[measurements]]
kind = "intrinsic_dimension"
model = "a"
dims = [10, 30]
epochs = 1
"""


def _run_study(tmp_path, text: str) -> tuple[Path, list[str]]:
    config = tmp_path / "study.toml"
    config.write_text(text)
    out = tmp_path / "run"
    result = runner.invoke(app, ["study", str(config), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["study", str(config), "--out", str(out), "-q"])
    assert again.exit_code == 0 and "ran 0 measurements" in again.output, again.output
    assert (out / "report.html").exists()
    import json

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in records), [r for r in records if r["status"] != "ok"]
    return out, [r["id"] for r in records]


def test_a_study_with_a_user_factory_and_user_data_runs_resumes_and_reports(tmp_path,
                                                                           user_package):
    out, ids = _run_study(tmp_path, STUDY + QUICK_MEASUREMENTS)
    assert {"train:a", "train:b", "connectivity", "curvature", "ntk", "transport"} <= set(ids)
    # its checkpoints record the user factory: ridgeline.load rebuilds them on their own
    from rl_userpkg.data import load

    model = ridgeline.load(out / "checkpoints" / "a.safetensors")
    x, _ = load("test")
    assert model[0].weight.shape == (6, 12) and model(x).shape == (48, 3)


@pytest.mark.slow
def test_a_study_with_user_code_runs_every_measurement(tmp_path, user_package):
    _, ids = _run_study(tmp_path, STUDY + ALL_MEASUREMENTS)
    assert {"barrier_prediction", "slice", "forward_gradient", "sharpness_aware",
            "intrinsic_dimension"} <= set(ids)
