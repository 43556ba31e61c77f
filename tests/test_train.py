"""Trainer determinism, callbacks, errors; checkpoint round trip and mismatch."""

from __future__ import annotations

import json

import pytest
import torch

import ridgeline
from ridgeline.data import gaussian_mixture
from ridgeline.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
)
from ridgeline.models import mlp


def _data():
    return gaussian_mixture(256, num_classes=3, dim=4, seed=0)


def _train(seed: int, **kwargs):
    torch.manual_seed(0)
    model = mlp(4, [16], 3)
    result = ridgeline.train(model, _data(), epochs=3, batch_size=32, seed=seed, progress=False,
                             eval_data=gaussian_mixture(64, num_classes=3, dim=4, split="test"),
                             **kwargs)
    return model, result


def test_training_is_deterministic_for_a_seed_and_learns():
    model_1, result_1 = _train(seed=5)
    model_2, _ = _train(seed=5)
    model_3, _ = _train(seed=6)
    for p, q in zip(model_1.parameters(), model_2.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(model_1.parameters(), model_3.parameters()))
    history = result_1.history
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert history[-1]["train_accuracy"] > 0.8
    json.dumps(result_1.to_dict())


def test_training_leaves_global_rng_untouched():
    model, data = mlp(4, [16], 3), _data()
    torch.manual_seed(42)
    expected = torch.rand(1)
    torch.manual_seed(42)
    ridgeline.train(model, data, epochs=1, progress=False)
    assert torch.equal(torch.rand(1), expected)


def test_callbacks_see_every_step():
    seen = []

    class Recorder(ridgeline.train.__globals__["Callback"]):  # the Callback base class
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, epoch, model, record):
            self.epochs.append(epoch)

    recorder = Recorder()
    _, result = _train(seed=0, callbacks=[lambda s: seen.append((s.step, s.epoch, len(s.indices))), recorder])
    assert len(seen) == result.steps == 3 * 8
    assert seen[0] == (1, 1, 32) and recorder.epochs == [1, 2, 3]


def test_adam_and_schedulers_and_unknown_optimizer():
    _, result = _train(seed=0, optimizer="adam", lr=1e-2, scheduler="cosine")
    assert result.config["optimizer"] == "adam"
    with pytest.raises(ConfigError, match="unknown optimizer"):
        _train(seed=0, optimizer="lbfgs-ish")
    with pytest.raises(ConfigError, match="takes no options"):
        _train(seed=0, optimizer="sgd", rho=0.1)


def test_diverging_training_raises():
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        _train(seed=0, lr=1e12)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model, _ = _train(seed=0)
    path = ridgeline.save(model, tmp_path / "m.safetensors", metadata={"note": "x"})
    rebuilt = ridgeline.load(path)  # architecture from the sidecar
    x = torch.randn(5, 4)
    assert torch.equal(rebuilt(x), model(x))
    into = ridgeline.load(path, mlp(4, [16], 3))
    assert torch.equal(into(x), model(x))
    with pytest.raises(ArchitectureMismatchError, match=r"'1.weight' has shape \(16, 4\)"):
        ridgeline.load(path, mlp(4, [8], 3))
    with pytest.raises(CheckpointError, match="does not exist"):
        ridgeline.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        ridgeline.load(tmp_path / "junk.safetensors", mlp(4, [16], 3))
