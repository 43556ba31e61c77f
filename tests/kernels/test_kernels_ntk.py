"""Empirical NTK against explicit Jacobians (torch.autograd.functional.jacobian)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call

from ridgeline.errors import (
    ConfigError,
    DataError,
    MemoryBudgetError,
    ShapeMismatchError,
    UnsupportedOperationError,
)
from ridgeline.kernels import empirical_ntk, plan_ntk
from ridgeline.models import cnn1d, mlp, resnet
from ridgeline.models.resnet import BasicBlock


def explicit_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """(N1, N2, O, O) from the full Jacobian of f(X) w.r.t. every trainable parameter."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = tuple(p.detach() for n, p in model.named_parameters() if p.requires_grad)
    x = torch.cat([x1, x2])

    def outputs(*flat):
        return functional_call(model, dict(zip(names, flat)), (x,)).reshape(x.shape[0], -1)

    jac = jacobian(outputs, values)
    o = jac[0].shape[1]
    j = torch.cat([t.reshape(x.shape[0], o, -1) for t in jac], dim=2)
    full = torch.einsum("aop,bqp->aboq", j, j)
    return full[: x1.shape[0], x1.shape[0]:]


class Block(nn.Module):
    """A ResNet basic block (conv-BN-ReLU-conv-BN + skip) with a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.block = BasicBlock(3, "batch", 1)
        self.head = nn.Linear(3 * 8, 2)

    def forward(self, x):
        return self.head(self.block(x).flatten(1))


def _models():
    torch.manual_seed(0)
    block = Block().double()
    for bn in (block.block.norm1, block.block.norm2):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return {
        "mlp": (mlp(5, [7, 6], 3).double(), (5,)),
        "mlp-ntk": (mlp(5, [8], 3, parameterization="ntk", weight_std=1.3, bias_std=0.4,
                        activation="tanh").double(), (5,)),
        "cnn": (cnn1d(1, (4, 5), 3).double(), (12,)),
        "cnn2d": (cnn1d(2, (3, 4), 3, dims=2).double(), (2, 6, 5)),
        "conv-dilated": (nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=2, bias=False),
                                       nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2), nn.Flatten(),
                                       nn.Linear(8, 2)).double(), (2, 9)),
        "resnet-block": (block.eval(), (3, 8)),
        "resnet-layernorm": (resnet(1, (3, 4), 2, norm="layer").double(), (10,)),
    }


MODELS = _models()


@pytest.mark.parametrize("name", list(MODELS))
def test_empirical_ntk_equals_explicit_jacobian_product(name):
    model, shape = MODELS[name]
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, *shape, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    truth = explicit_ntk(model, x1, x2)
    truth_self = explicit_ntk(model, x1, x1)
    o = truth.shape[-1]
    full = empirical_ntk(model, x1, x2, trace=None, method="jacobian")
    torch.testing.assert_close(full, truth, rtol=1e-10, atol=1e-10)
    summed = empirical_ntk(model, x1, trace="sum", method="jacobian")
    torch.testing.assert_close(summed, truth_self.diagonal(dim1=2, dim2=3).sum(-1),
                               rtol=1e-10, atol=1e-10)
    mean = empirical_ntk(model, x1, x2, trace="mean", method="jacobian")
    torch.testing.assert_close(mean, truth.diagonal(dim1=2, dim2=3).sum(-1) / o,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet-block"])
def test_both_methods_agree(name):
    model, shape = MODELS[name]
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(6, *shape, generator=gen, dtype=torch.float64)
    x2 = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
    for trace in ("sum", None):
        for other in (None, x2):
            a = empirical_ntk(model, x1, other, trace=trace, method="jacobian")
            b = empirical_ntk(model, x1, other, trace=trace, method="ntk_vp")
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
def test_tiled_equals_untiled(method):
    model, shape = MODELS["mlp-ntk"]
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(11, *shape, generator=gen, dtype=torch.float64)
    x2 = torch.randn(7, *shape, generator=gen, dtype=torch.float64)
    for trace in ("sum", None):
        for other in (None, x2):
            whole = empirical_ntk(model, x1, other, trace=trace, method=method, chunk_size=64)
            for chunk in (1, 4):
                tiled = empirical_ntk(model, x1, other, trace=trace, method=method,
                                      chunk_size=chunk)
                torch.testing.assert_close(tiled, whole, rtol=1e-12, atol=1e-12)


def test_streaming_tiles_equal_resident_ones():
    """A budget too small to hold every Jacobian recomputes them per tile: same kernel."""
    model, shape = MODELS["resnet-layernorm"]
    x1 = torch.randn(9, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    plan = plan_ntk(model, x1, chunk_size=2, method="jacobian", memory_budget="1GiB")
    assert plan.resident
    budget = plan.estimated_bytes
    while plan.resident:  # shrink the budget until the Jacobians no longer fit at once
        budget = int(budget * 0.9)
        plan = plan_ntk(model, x1, chunk_size=2, method="jacobian", memory_budget=budget)
    assert plan.estimated_bytes <= budget
    torch.testing.assert_close(
        empirical_ntk(model, x1, chunk_size=2, method="jacobian", memory_budget=budget),
        empirical_ntk(model, x1, method="jacobian"), rtol=1e-12, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 9), width=st.integers(1, 12), outputs=st.integers(1, 4),
       chunk=st.integers(1, 5), seed=st.integers(0, 1000))
def test_kernel_of_one_input_set_is_symmetric_psd(n, width, outputs, chunk, seed):
    torch.manual_seed(seed)
    model = mlp(3, [width], outputs, activation="tanh").double()
    x = torch.randn(n, 3, dtype=torch.float64)
    k = empirical_ntk(model, x, chunk_size=chunk)
    assert torch.equal(k, k.T)
    assert float(torch.linalg.eigvalsh(k).min()) >= -1e-10 * max(1.0, float(k.abs().max()))
    full = empirical_ntk(model, x, trace=None, chunk_size=chunk)
    assert torch.equal(full, full.permute(1, 0, 3, 2))
    matrix = full.permute(0, 2, 1, 3).reshape(n * outputs, n * outputs)
    assert float(torch.linalg.eigvalsh(matrix).min()) >= -1e-10 * max(1.0, float(matrix.abs().max()))


class Shared(nn.Module):
    """One linear layer applied twice (tied weights) and a layer on sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.seq = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 2)
        self.frozen.weight.requires_grad_(False)

    def forward(self, x):  # x: (N, T, 4)
        h = torch.tanh(self.inner(torch.tanh(self.inner(x))))
        return self.frozen(torch.tanh(self.seq(h))).sum(1)


def test_tied_sequence_and_frozen_layers_match_explicit_jacobian():
    torch.manual_seed(5)
    model = Shared().double()
    x1 = torch.randn(4, 3, 4, dtype=torch.float64)
    x2 = torch.randn(3, 3, 4, dtype=torch.float64)
    plan = plan_ntk(model, x1, x2, method="jacobian")
    assert plan.factored_layers == ()  # tied / sequence layers keep full Jacobians
    assert plan.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(empirical_ntk(model, x1, x2, trace=None), explicit_ntk(model, x1, x2),
                               rtol=1e-10, atol=1e-10)


def test_auto_picks_vector_products_when_they_are_cheaper():
    """A layer on (1, d) sequences is not factored; with many outputs and the full kernel,
    N²·O·3F < N²·O²·P and the NTK-vector products win."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 30)).double()
    x = torch.randn(5, 1, 6, dtype=torch.float64)
    plan = plan_ntk(model, x, trace=None)
    assert plan.method == "ntk_vp"
    assert plan_ntk(model, x, trace="sum").method == "jacobian"
    torch.testing.assert_close(empirical_ntk(model, x, trace=None), explicit_ntk(model, x, x),
                               rtol=1e-10, atol=1e-10)


def test_auto_uses_factored_jacobians_for_mlps():
    model, _ = MODELS["mlp"]
    plan = plan_ntk(model, torch.randn(8, 5, dtype=torch.float64))
    assert plan.method == "jacobian" and plan.factored_layers == ("1", "3", "5")
    assert plan.to_dict()["factored_layers"] == ["1", "3", "5"]


# ----------------------------------------------------------------------------- bad input
def test_batchnorm_in_train_mode_is_refused():
    model = resnet(1, (4,), 2, norm="batch").train()
    with pytest.raises(UnsupportedOperationError, match="BatchNorm.*train mode.*model.eval"):
        empirical_ntk(model, torch.randn(3, 10))
    model.eval()
    assert empirical_ntk(model, torch.randn(3, 10)).shape == (3, 3)


def test_dropout_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    with pytest.raises(UnsupportedOperationError, match="Dropout"):
        empirical_ntk(model, torch.randn(2, 3))


def test_wrong_input_shapes_are_refused():
    model = mlp(5, [4], 2)
    with pytest.raises(ShapeMismatchError, match="one example of shape"):
        empirical_ntk(model, torch.randn(3, 7))
    with pytest.raises(ShapeMismatchError, match="x2"):
        empirical_ntk(model, torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(ShapeMismatchError, match="leading example axis"):
        empirical_ntk(model, torch.randn(0, 5))


def test_inputs_on_different_devices_or_dtypes_are_refused():
    model = mlp(5, [4], 2)
    with pytest.raises(DataError, match="dtype"):
        empirical_ntk(model, torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(DataError, match="meta"):
        empirical_ntk(model, torch.randn(3, 5), torch.empty(3, 5, device="meta"))
    with pytest.raises(DataError, match="model's parameters"):
        empirical_ntk(model, torch.randn(3, 5, dtype=torch.float64))


def test_over_budget_names_a_chunk_size_that_fits():
    torch.manual_seed(7)
    model = mlp(20, [64], 10)
    x = torch.randn(300, 20)
    whole = plan_ntk(model, x, chunk_size=300, memory_budget="10GiB")
    budget = whole.estimated_bytes // 2
    with pytest.raises(MemoryBudgetError, match=r"chunk_size=300.*chunk_size=(\d+)") as info:
        empirical_ntk(model, x, chunk_size=300, memory_budget=budget)
    import re

    suggested = int(re.search(r"\. chunk_size=(\d+)", str(info.value)).group(1))
    assert 1 <= suggested < 300
    plan = plan_ntk(model, x, chunk_size=suggested, memory_budget=budget)
    assert plan.estimated_bytes <= budget
    torch.testing.assert_close(empirical_ntk(model, x, chunk_size=suggested, memory_budget=budget),
                               empirical_ntk(model, x), rtol=1e-4, atol=1e-4)
    assert plan_ntk(model, x, memory_budget=budget).estimated_bytes <= budget


def test_output_larger_than_budget_says_so():
    model = mlp(4, [3], 10)
    with pytest.raises(MemoryBudgetError, match="output alone"):
        empirical_ntk(model, torch.randn(100, 4), trace=None, memory_budget="1MB")


def test_bad_options_are_refused():
    model, x = mlp(4, [3], 2), torch.randn(3, 4)
    with pytest.raises(ConfigError, match="trace"):
        empirical_ntk(model, x, trace="max")
    with pytest.raises(ConfigError, match="method"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(ConfigError, match="chunk_size"):
        empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ConfigError, match="memory_budget"):
        empirical_ntk(model, x, memory_budget="lots")
    frozen = mlp(4, [3], 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        empirical_ntk(frozen, x)


def test_memory_budget_accepts_sizes():
    model, x = mlp(4, [3], 2), torch.randn(3, 4)
    assert plan_ntk(model, x, memory_budget="2 MiB").memory_budget == 2 * 2 ** 20
    assert plan_ntk(model, x, memory_budget=1e6).memory_budget == 10 ** 6
