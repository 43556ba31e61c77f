"""Objective against plain PyTorch computations over the full dataset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ridgeline import Objective, as_objective
from ridgeline.errors import DataError, NonFiniteLossError, ShapeMismatchError
from ridgeline.models import mlp
from ridgeline.params import flatten, unflatten


def full_batch_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("batch_size", [None, 5, 23, 100])
def test_loss_and_grad_equal_plain_full_dataset_autograd(tiny_mlp, tiny_data, batch_size):
    x, y = tiny_data  # 23 examples: batch 5 leaves an uneven last batch of 3
    objective = Objective(tiny_mlp, (x, y), batch_size=batch_size)
    loss, grads = objective.loss_and_grad()
    expected = full_batch_loss(tiny_mlp, x, y)
    expected_grads = torch.autograd.grad(expected, list(tiny_mlp.parameters()))
    assert torch.allclose(loss, expected.detach(), atol=1e-12)
    for got, want in zip(grads.values(), expected_grads):
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(objective.loss(), expected.detach(), atol=1e-12)


def test_dataloader_with_uneven_last_batch_is_weighted_by_size(tiny_mlp, tiny_data):
    x, y = tiny_data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    objective = Objective(tiny_mlp, loader)
    assert objective.num_examples == 23
    assert torch.allclose(objective.loss(), full_batch_loss(tiny_mlp, x, y).detach(), atol=1e-12)


def test_hvp_equals_explicit_hessian_times_vector(tiny_mlp, tiny_data):
    x, y = tiny_data
    objective = Objective(tiny_mlp, (x, y), batch_size=7)
    params = objective.params()
    theta = flatten(params)

    def loss_of_flat(flat):
        return nn.functional.cross_entropy(objective.forward(unflatten(flat, params), x), y)

    hessian = torch.autograd.functional.hessian(loss_of_flat, theta)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    hv = flatten(objective.hvp(unflatten(v, params)))
    assert torch.allclose(hv, hessian @ v, atol=1e-10)


def test_mse_loss_is_half_squared_error_mean(tiny_data):
    x, _ = tiny_data
    targets = torch.randn(23, 2, dtype=torch.float64)
    torch.manual_seed(0)
    model = mlp(5, [4], 2).double()
    objective = Objective(model, (x, targets), loss="mse")
    expected = 0.5 * ((model(x) - targets) ** 2).sum(dim=1).mean()
    assert torch.allclose(objective.loss(), expected.detach(), atol=1e-12)
    assert objective.loss_and_accuracy()[1] is None


def test_accuracy_matches_argmax(tiny_mlp, tiny_data):
    x, y = tiny_data
    _, acc = Objective(tiny_mlp, (x, y), batch_size=4).loss_and_accuracy()
    assert acc == pytest.approx(float((tiny_mlp(x).argmax(1) == y).double().mean()))


def test_buffers_are_carried_and_never_updated():
    torch.manual_seed(0)
    model = mlp(5, [8], 3, norm="batch")
    model.train()
    model(torch.randn(32, 5))  # give the BN running stats non-trivial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for train_mode in (False, True):
        Objective(model, (x, y), train_mode=train_mode).loss_and_grad()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.eval()
    assert torch.allclose(Objective(model, (x, y)).loss(), nn.functional.cross_entropy(model(x), y))


def test_non_finite_loss_names_the_batch(tiny_mlp, tiny_data):
    x, y = tiny_data
    objective = Objective(tiny_mlp, (x, y), batch_size=5)
    params = objective.params()
    params["1.weight"] = params["1.weight"].clone()
    params["1.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="batch 0"):
        objective.loss(params)


def test_bad_inputs_raise_clear_errors(tiny_mlp, tiny_data):
    x, y = tiny_data
    with pytest.raises(ShapeMismatchError, match="inputs of shape"):
        Objective(tiny_mlp, (torch.randn(23, 6, dtype=torch.float64), y))
    with pytest.raises(DataError, match="labels range"):
        Objective(tiny_mlp, (x, y + 5))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        Objective(tiny_mlp, (bad, y))
    with pytest.raises(ShapeMismatchError, match="scalar"):
        Objective(tiny_mlp, (x, y), loss=lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"))
    with pytest.raises(DataError, match="4 targets"):
        Objective(tiny_mlp, (x, y[:4]))
    with pytest.raises(DataError, match="data is required"):
        as_objective(tiny_mlp)
    with pytest.raises(DataError, match="must be"):
        Objective(tiny_mlp, 42)


def test_as_objective_passes_objective_through(tiny_mlp, tiny_data):
    objective = Objective(tiny_mlp, tiny_data)
    assert as_objective(objective) is objective
