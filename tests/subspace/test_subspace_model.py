"""SubspaceModel: full-dimension orthogonal subspaces reproduce full training; gradients
w.r.t. z equal Pᵀ ∇θ L with P explicit; buffers are carried; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ridgeline
from ridgeline import Objective
from ridgeline.errors import ConfigError, MemoryBudgetError
from ridgeline.models import mlp
from ridgeline.params import flatten, named_parameters
from ridgeline.subspace import DenseProjection, SubspaceModel


def tiny_model(norm=None):
    torch.manual_seed(0)
    return mlp(5, [6], 3, activation="tanh", norm=norm).double()


def full_gradient(model, x, y):
    """∇θ L of a plain model by autograd, flattened in parameter order."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_full_dimension_orthogonal_subspace_matches_full_sgd_training(tiny_data, momentum):
    full = tiny_model()
    num = sum(p.numel() for p in full.parameters())
    sub = SubspaceModel(full, num, projection="orthogonal", seed=5)
    q = sub.projection.matrix
    torch.testing.assert_close(q.T @ q, torch.eye(num, dtype=torch.float64))
    settings = dict(optimizer="sgd", lr=0.1, momentum=momentum, epochs=2, batch_size=8, seed=0,
                    progress=False)
    ridgeline.train(full, tiny_data, **settings)
    ridgeline.train(sub, tiny_data, **settings)
    # θ = θ₀ + Q z with Q orthogonal: z ← z − η Qᵀg maps to θ ← θ − η Q Qᵀ g = θ − η g
    got = {k: v.detach() for k, v in sub.full_parameters().items()}
    for name, value in named_parameters(full).items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("projection", ["dense", "sparse", "fastfood"])
def test_gradient_wrt_z_equals_projection_transpose_times_full_gradient(tiny_data, projection):
    x, y = tiny_data
    sub = SubspaceModel(tiny_model(), 9, projection=projection, seed=1)
    with torch.no_grad():
        sub.z.copy_(torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    p = sub.projection.materialize()
    nn.functional.cross_entropy(sub(x), y).backward()
    # the same point θ₀ + P z as a plain model, differentiated in all D parameters
    g = full_gradient(sub.to_full_model(), x, y)
    torch.testing.assert_close(sub.z.grad, p.T @ g, rtol=1e-10, atol=1e-12)
    # and through Objective (torch.func path used by every instrument)
    torch.testing.assert_close(Objective(sub, tiny_data).grad()["z"], p.T @ g, rtol=1e-10, atol=1e-12)


def test_z_is_the_only_parameter_and_starts_at_the_models_point(tiny_data, tiny_mlp):
    x, _ = tiny_data
    sub = SubspaceModel(tiny_mlp, 4, projection="fastfood")
    assert [name for name, _ in sub.named_parameters()] == ["z"]
    assert torch.count_nonzero(sub.z) == 0
    torch.testing.assert_close(sub(x), tiny_mlp(x))
    torch.testing.assert_close(sub.theta0, flatten(named_parameters(tiny_mlp)))
    assert sub.num_params == sum(p.numel() for p in tiny_mlp.parameters()) and sub.dim == 4
    assert set(sub.state_dict()) == {"z", "theta0"}  # projection is rebuilt from its seed


def test_the_wrapped_model_is_not_modified(tiny_mlp):
    before = {k: v.clone() for k, v in tiny_mlp.state_dict().items()}
    sub = SubspaceModel(tiny_mlp, 3)
    with torch.no_grad():
        sub.z.fill_(1.0)
    assert len(list(tiny_mlp.parameters())) == 4
    for key, value in tiny_mlp.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_batchnorm_buffers_are_carried_and_updated_in_train_mode(tiny_data):
    x, _ = tiny_data
    model = tiny_model(norm="batch")
    sub = SubspaceModel(model, 5, projection="sparse")
    assert "base.2.running_mean" in sub.state_dict()
    sub.train()
    sub(x)
    reference = tiny_model(norm="batch").train()
    reference(x)
    torch.testing.assert_close(sub.base[2].running_mean, reference[2].running_mean)
    assert torch.count_nonzero(model[2].running_mean) == 0  # the original is untouched
    sub.eval()
    torch.testing.assert_close(sub(x), sub.to_full_model().eval()(x))


def test_frozen_parameters_stay_fixed_and_out_of_the_subspace(tiny_data):
    x, y = tiny_data
    model = tiny_model()
    model[-1].bias.requires_grad_(False)
    sub = SubspaceModel(model, 4)
    assert sub.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ridgeline.train(sub, tiny_data, epochs=1, batch_size=8, progress=False)
    torch.testing.assert_close(sub.to_full_model()[-1].bias, model[-1].bias.detach())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4, dtype=torch.float64)
        self.second = nn.Linear(4, 4, dtype=torch.float64)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_tied_weights_share_one_block_of_theta():
    torch.manual_seed(0)
    model = Tied()
    x = torch.randn(6, 4, dtype=torch.float64)
    sub = SubspaceModel(model, 3, projection="dense")
    assert sub.num_params == 16 + 4 + 4
    with torch.no_grad():
        sub.z.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    full = sub.to_full_model()
    assert full.second.weight is full.first.weight
    torch.testing.assert_close(sub(x), full(x))
    sub(x).square().sum().backward()
    full(x).square().sum().backward()
    g = torch.cat([p.grad.reshape(-1) for p in full.parameters()])
    torch.testing.assert_close(sub.z.grad, sub.projection.materialize().T @ g)


def test_training_in_a_subspace_lowers_the_loss_with_any_optimizer(tiny_data):
    sub = SubspaceModel(tiny_model(), 10, projection="fastfood")
    before = Objective(sub, tiny_data).loss()
    opt = torch.optim.Adam(sub.parameters(), lr=0.05)
    result = ridgeline.train(sub, tiny_data, optimizer=opt, epochs=20, batch_size=23, progress=False)
    assert result.final["train_loss"] < 0.9 * float(before)


def test_checkpoint_round_trip_rebuilds_the_same_function(tmp_path, tiny_data):
    x, _ = tiny_data
    sub = SubspaceModel(tiny_model(), 6, projection="sparse", seed=3)
    ridgeline.train(sub, tiny_data, epochs=2, batch_size=8, progress=False)
    path = ridgeline.save(sub, tmp_path / "sub.safetensors")
    torch.manual_seed(123)  # a different initialisation: θ₀ comes from the checkpoint
    other = mlp(5, [6], 3, activation="tanh").double()
    loaded = ridgeline.load(path, SubspaceModel(other, 6, projection="sparse", seed=3))
    torch.testing.assert_close(loaded(x), sub(x))


def test_explicit_projection_instance_is_used():
    model = tiny_model()
    num = sum(p.numel() for p in model.parameters())
    matrix = torch.zeros(num, 2, dtype=torch.float64)
    matrix[0, 0] = matrix[1, 1] = 1.0
    sub = SubspaceModel(model, 2, projection=DenseProjection(num, 2, matrix=matrix))
    with torch.no_grad():
        sub.z.copy_(torch.tensor([2.0, 3.0], dtype=torch.float64))
    delta = sub.theta().detach() - sub.theta0
    assert delta[0] == 2.0 and delta[1] == 3.0 and torch.count_nonzero(delta) == 2


@pytest.mark.parametrize("dim", [0, -3, 200, 2.5, True])
def test_bad_dim_is_rejected_with_the_parameter_count(dim):
    with pytest.raises(ConfigError, match="1 ≤ dim ≤ D = 57"):
        SubspaceModel(tiny_model(), dim)


def test_model_without_trainable_parameters_is_rejected():
    with pytest.raises(ConfigError, match="no trainable parameters"):
        SubspaceModel(nn.ReLU(), 1)
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        SubspaceModel(frozen, 1)


def test_unknown_projection_and_memory_budget_are_rejected():
    with pytest.raises(ConfigError, match="unknown projection 'hadamard'"):
        SubspaceModel(tiny_model(), 3, projection="hadamard")
    with pytest.raises(MemoryBudgetError, match="over the memory budget"):
        SubspaceModel(tiny_model(), 50, projection="dense", memory_budget=1000)
