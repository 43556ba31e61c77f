"""MESA's teacher is the EMA of the weights; its loss is the KL to that teacher's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax
from torch import nn
from torch.func import functional_call

import ridgeline
from ridgeline.errors import ConfigError
from ridgeline.optim import EMATeacherLoss
from ridgeline.optim.methods import MESAStep


def _net(seed: int, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 10)] + ([nn.BatchNorm1d(10)] if norm else []) + [nn.ReLU(), nn.Linear(10, 3)]
    return nn.Sequential(*layers)


def _data(n: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


class _Recorder:
    """Records the student's state after every training step."""

    def __init__(self):
        self.states = []

    def on_train_begin(self, model):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_step(self, state):
        self.states.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})


@pytest.mark.parametrize("norm", [False, True])
def test_teacher_is_the_ema_of_the_weights_over_training(norm):
    model = _net(0, norm=norm)
    decay = 0.8
    teacher = EMATeacherLoss(model, decay=decay, start_epoch=2, weight=0.5)
    rule = MESAStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    nn.functional.cross_entropy, teacher)
    recorder = _Recorder()
    ridgeline.train(model, _data(), optimizer=rule, epochs=3, batch_size=8, progress=False,
                    callbacks=[recorder])
    # independent EMA over the recorded student states: θ_T ← d θ_T + (1 − d) θ
    ema = {k: v.double() for k, v in recorder.states[0].items()}
    for state in recorder.states[1:]:
        for key, value in state.items():
            ema[key] = value.double() if not value.is_floating_point() else decay * ema[key] + (1 - decay) * value.double()
    assert teacher.updates == len(recorder.states) - 1 == 15
    for key, value in teacher.teacher.state_dict().items():
        torch.testing.assert_close(value.double(), ema[key], rtol=1e-5, atol=1e-6)


def test_loss_equals_direct_kl_to_the_teacher_outputs_and_is_zero_before_start():
    model = _net(1)
    teacher = EMATeacherLoss(model, decay=0.5, temperature=2.0, weight=0.8, start_epoch=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    teacher.update()
    x, _ = _data(12, seed=1)
    outputs = model(x)
    assert float(teacher(x, outputs, 4)) == 0.0  # start_epoch = 3: on from the 5th epoch
    value = teacher(x, outputs, 5)
    # teacher weights by hand: 0.5·θ0 + 0.5·(θ0 + 0.3) = θ0 + 0.15
    theta0 = {k: v - 0.3 for k, v in dict(model.named_parameters()).items()}
    t_logits = functional_call(model, {k: v + 0.15 for k, v in theta0.items()}, (x,)).detach().numpy()
    s_logits = outputs.detach().numpy()
    p = softmax(t_logits / 2.0, axis=1)
    kl = (p * (log_softmax(t_logits / 2.0, axis=1) - log_softmax(s_logits / 2.0, axis=1))).sum(1)
    assert float(value.detach()) == pytest.approx(0.8 * 4.0 * kl.mean(), rel=1e-5)
    assert teacher.memory_bytes == sum(p.numel() * 4 for p in model.parameters())


def _authors_kl_is_on(epoch0: int, kl_start_epoch: int) -> bool:
    """The rule of the authors' MESA_train.py, epochs counted from 0 by range(start, num)."""
    return epoch0 > kl_start_epoch


@pytest.mark.parametrize("first_epoch", [1, 0])
def test_kl_starts_in_the_same_epoch_of_training_as_the_authors_code(first_epoch):
    """The term is on exactly where the authors' ``epoch > kl_start_epoch`` (0-based) is,
    whether the caller counts epochs from 1 or from 0 (the same rule as SAF's)."""
    model = _net(3)
    teacher = EMATeacherLoss(model, decay=0.5, start_epoch=5, first_epoch=first_epoch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2)  # student ≠ teacher, so an active term is > 0
    x, _ = _data(8, seed=2)
    outputs = model(x)
    on = [float(teacher(x, outputs, first_epoch + k).detach()) > 0 for k in range(10)]
    assert on == [_authors_kl_is_on(k, 5) for k in range(10)]  # from the 7th epoch
    assert teacher.first_active_epoch == first_epoch + 6
    assert teacher.describe()["first_active_epoch"] == first_epoch + 6


def test_teacher_gets_no_gradient_and_bad_arguments_fail():
    model = _net(2)
    teacher = EMATeacherLoss(model, start_epoch=0)
    x, _ = _data(5)
    teacher(x, model(x), 2).backward()  # start_epoch = 0: on from the 2nd epoch
    assert all(p.grad is None for p in teacher.teacher.parameters())
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ConfigError, match="decay"):
        EMATeacherLoss(model, decay=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        EMATeacherLoss(model, temperature=0.0)
    np.testing.assert_equal(teacher.describe()["start_epoch"], 0)


def test_ema_decay_defaults_are_the_authors_0_9998_and_a_three_epoch_horizon():
    """EMATeacherLoss defaults to d = 0.9998, the `--model-ema-decay` default of the authors'
    MESA_train.py (Du et al. 2022; docs/methods.md §3); the "mesa" training method defaults
    to d = 1 − 1/(3·steps per epoch), 0.99973 at the authors' 1251 ImageNet steps per epoch."""
    from ridgeline.optim.methods import mesa_method
    from ridgeline.train import MethodContext

    model = _net(0)
    assert EMATeacherLoss(model).decay == 0.9998
    for steps, expected in ((1251, 1 - 1 / 3753), (32, 1 - 1 / 96)):
        ctx = MethodContext(model=model, loss_fn=ridgeline.losses.cross_entropy, lr=0.1,
                            momentum=0.9, weight_decay=0.0, epochs=10, num_examples=40,
                            num_outputs=3, steps_per_epoch=steps, seed=0)
        assert mesa_method(ctx).teacher.decay == pytest.approx(expected, rel=1e-15)
