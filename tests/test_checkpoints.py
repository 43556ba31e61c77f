"""ridgeline.load/save: every checkpoint format, safe loading, and errors that list tensors."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import ridgeline
from ridgeline.checkpoints import read_state_dict
from ridgeline.errors import ArchitectureMismatchError, CheckpointError, ConfigError
from ridgeline.models import mlp


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp(5, [7], 3)


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_plain_state_dict_files_load_into_the_named_model(tmp_path, suffix):
    net = _net()
    path = tmp_path / f"weights{suffix}"
    torch.save(net.state_dict(), path)
    loaded = ridgeline.load(path, factory="mlp",
                            model_args={"in_features": 5, "widths": [7], "out_features": 3})
    assert _same_state(loaded, net) and not loaded.training
    into = ridgeline.load(path, _net(seed=1))
    assert _same_state(into, net)


def test_safetensors_without_a_sidecar_needs_the_model_and_then_loads(tmp_path):
    from safetensors.torch import save_file

    net = _net()
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="--model"):
        ridgeline.load(path)
    assert _same_state(ridgeline.load(path, _net(seed=3)), net)


def test_save_then_load_rebuilds_a_registered_model_from_the_sidecar(tmp_path):
    net = _net()
    path = ridgeline.save(net, tmp_path / "m.safetensors")
    assert _same_state(ridgeline.load(path), net)
    # the old import location keeps working
    from ridgeline.train import load, save

    assert load is ridgeline.load and save is ridgeline.save


def test_save_writes_safetensors_whatever_the_name_but_never_a_pt_file(tmp_path):
    net = _net()
    assert _same_state(ridgeline.load(ridgeline.save(net, tmp_path / "model")), net)
    with pytest.raises(CheckpointError, match="m.safetensors"):
        ridgeline.save(net, tmp_path / "m.pt")


def test_tied_weights_are_saved(tmp_path):
    net = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False))
    net[1].weight = net[0].weight
    path = ridgeline.save(net, tmp_path / "tied.safetensors")
    assert set(read_state_dict(path)) == {"0.weight", "1.weight"}


# ----------------------------------------------------------------------------- safety
class _Payload:
    """Unpickling this object runs ``exec``, which writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        ridgeline.load(path, _net())
    with pytest.raises(CheckpointError, match="refused"):
        ridgeline.load(path, factory="mlp", model_args={"in_features": 5, "widths": [7],
                                                       "out_features": 3})
    assert not marker.exists()
    # ground truth: the payload is live, an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_the_cli_refuses_a_malicious_pickle_without_running_it(tmp_path):
    from typer.testing import CliRunner

    from ridgeline.cli import app

    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, path)
    result = CliRunner().invoke(app, ["curvature", str(path), "--model", "mlp", "--model-args",
                                      '{"in_features": 40, "widths": [8], "out_features": 10}'])
    assert result.exit_code == 2 and "refused" in result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_a_sidecar_cannot_run_standard_library_code(tmp_path):
    marker = tmp_path / "sidecar-marker"
    path = ridgeline.save(_net(), tmp_path / "m.safetensors")
    sidecar = tmp_path / "m.safetensors.json"
    info = json.loads(sidecar.read_text())
    info["architecture"] = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}
    sidecar.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="os:system"):
        ridgeline.load(path)
    assert not marker.exists()


def test_a_training_checkpoint_is_not_a_plain_state_dict(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": _net().state_dict()}, path)
    with pytest.raises(CheckpointError, match="'model'"):
        ridgeline.load(path, _net())


@pytest.mark.parametrize("content", [b"", b"not a torch file at all"])
def test_unreadable_files_are_checkpoint_errors(tmp_path, content):
    for name in ("bad.pt", "bad.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError):
            ridgeline.load(tmp_path / name, _net())
    (tmp_path / "weights.ckpt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"\.pt"):
        ridgeline.load(tmp_path / "weights.ckpt", _net())
    with pytest.raises(CheckpointError, match="does not exist"):
        ridgeline.load(tmp_path / "missing.pt", _net())


# ----------------------------------------------------------------------------- mismatches
def test_tensors_that_do_not_fit_are_listed(tmp_path):
    path = tmp_path / "w.pt"
    state = _net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["1.bias"]
    torch.save(state, path)
    wide = mlp(5, [9], 3)
    with pytest.raises(ArchitectureMismatchError) as info:
        ridgeline.load(path, wide)
    message = str(info.value)
    assert "'1.bias' missing" in message and "'extra.weight' is in the checkpoint" in message
    assert "'1.weight' has shape (7, 5) in the checkpoint but (9, 5)" in message


def test_a_sidecar_with_bad_arguments_is_a_checkpoint_error(tmp_path):
    path = ridgeline.save(_net(), tmp_path / "m.safetensors")
    sidecar = tmp_path / "m.safetensors.json"
    info = json.loads(sidecar.read_text())
    info["architecture"]["kwargs"]["depth"] = 3
    sidecar.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="depth"):
        ridgeline.load(path)
    info["architecture"]["kwargs"] = {"in_features": "five", "widths": [7], "out_features": 3}
    sidecar.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="mlp"):
        ridgeline.load(path)
    sidecar.write_text("{not json")
    with pytest.raises(CheckpointError, match="sidecar"):
        ridgeline.load(path)


def test_model_and_factory_are_exclusive(tmp_path):
    path = ridgeline.save(_net(), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError):
        ridgeline.load(path, _net(), factory="mlp")
    with pytest.raises(ConfigError, match="factory"):
        ridgeline.load(path, model_args={"in_features": 5})


# ----------------------------------------------------------------------------- user factories
def test_a_user_model_records_its_import_path_and_reloads(tmp_path, user_package):
    from ridgeline.models import build_model

    torch.manual_seed(0)
    net = build_model("rl_userpkg.nets:make", in_features=4, width=6, out_features=2)
    path = ridgeline.save(net, tmp_path / "user.safetensors")
    info = json.loads((tmp_path / "user.safetensors.json").read_text())
    assert info["architecture"] == {"factory": "rl_userpkg.nets:make",
                                    "kwargs": {"in_features": 4, "width": 6, "out_features": 2}}
    loaded = ridgeline.load(path)
    assert _same_state(loaded, net)
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), net(x))


# ----------------------------------------------------------------------------- Hugging Face
def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=17, n_positions=8)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_a_hugging_face_folder_loads_through_transformers(tmp_path):
    model = _tiny_gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    loaded = ridgeline.load(tmp_path / "gpt2")
    assert type(loaded).__name__ == "GPT2LMHeadModel" and not loaded.training
    assert _same_state(loaded, model)
    # the folder's weights also load into a model you pass
    into = ridgeline.load(tmp_path / "gpt2", _tiny_gpt2().__class__(model.config))
    assert _same_state(into, model)


def test_a_hugging_face_folder_with_a_pytorch_bin_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, vocab_size=30, num_labels=3,
                                     max_position_embeddings=16,
                                     architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    folder = tmp_path / "bert"
    config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = ridgeline.load(folder)
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert _same_state(loaded, model)
    assert _same_state(ridgeline.load(folder, transformers.BertForSequenceClassification(config)),
                       model)


def test_a_hugging_face_folder_with_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_gpt2()
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in state if k.endswith("ln_f.weight"))
    del state[dropped]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArchitectureMismatchError, match="ln_f.weight"):
        ridgeline.load(folder)


def test_a_hugging_face_folder_without_transformers_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(CheckpointError, match=r"pip install 'ridgeline\[hf\]'"):
        ridgeline.load(folder)


def test_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        ridgeline.load(tmp_path)
    assert os.path.isdir(tmp_path)
