"""Curvature API: bad input, eval-mode notes, memory budget, scipy interop, results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ridgeline import Objective, curvature
from ridgeline.errors import (
    ConfigError,
    ConvergenceWarning,
    DataError,
    MemoryBudgetError,
    ShapeMismatchError,
    UnsupportedOperationError,
)
from ridgeline.models import mlp

F64 = torch.float64


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp(5, [6], 3, activation="tanh").double()
    x = torch.randn(19, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (19,), generator=gen)
    return model, x, y


def test_more_eigenvalues_than_parameters_is_refused(problem):
    model, x, y = problem
    with pytest.raises(ConfigError, match=r"k=58 .* only 57"):
        curvature.top_eigenvalues(model, (x, y), k=58)


def test_non_convergence_returns_estimates_and_warns(problem):
    model, x, y = problem
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        spectrum = curvature.top_eigenvalues(model, (x, y), k=2, tol=1e-14, max_iter=4)
    assert not spectrum.converged and spectrum.matvecs == 4
    assert spectrum.residuals.shape == (2,) and bool((spectrum.residuals > 0).all())


def test_dense_over_budget_raises_with_the_size(problem):
    model, x, y = problem
    op = curvature.hessian(model, (x, y))
    with pytest.raises(MemoryBudgetError, match=r"57×57 matrix of 25\.4 KiB.*param_filter"):
        op.dense(memory_budget="10KB")
    big = curvature.hessian(mlp(40, [256, 256], 10), (torch.randn(4, 40), torch.arange(4)))
    with pytest.raises(MemoryBudgetError, match=r"78,858×78,858 matrix of 23\.2 GiB"):
        big.dense()


def test_operator_rejects_wrong_shapes_and_filters(problem):
    model, x, y = problem
    op = curvature.hessian(model, (x, y))
    with pytest.raises(ShapeMismatchError, match="57"):
        op.matvec(torch.zeros(10, dtype=F64))
    with pytest.raises(ShapeMismatchError):
        op.matmat(torch.zeros(57, dtype=F64))
    with pytest.raises(ConfigError, match="selects no parameter"):
        curvature.hessian(model, (x, y), param_filter="conv")
    with pytest.raises(ConfigError, match="curvature must be one of"):
        curvature.top_eigenvalues(model, (x, y), curvature="laplacian")
    with pytest.raises(DataError):
        curvature.hessian(model)


def test_batchnorm_model_is_evaluated_in_eval_mode_and_says_so():
    torch.manual_seed(0)
    model = mlp(5, [6], 3, norm="batch").double().train()
    x, y = torch.randn(12, 5, dtype=F64), torch.randint(0, 3, (12,))
    spectrum = curvature.top_eigenvalues(model, (x, y), k=1)
    assert spectrum.mode == "eval" and any("eval mode" in n for n in spectrum.notes)
    assert model.training  # the caller's flags are restored
    # eval-mode curvature does not depend on how the data is batched
    one = curvature.hessian(model, (x, y)).dense()
    three = curvature.hessian(model, (x, y), batch_size=4).dense()
    torch.testing.assert_close(one, three)


def test_dropout_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    data = (torch.randn(8, 4, dtype=F64), torch.randint(0, 2, (8,)))
    with pytest.raises(UnsupportedOperationError, match="Dropout"):
        curvature.hessian(Objective(model, data, train_mode=True))
    assert any("Dropout" in n for n in curvature.hessian(model, data).notes)


def test_data_loader_and_tensor_data_give_the_same_operator(problem):
    model, x, y = problem
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    v = torch.randn(57, dtype=F64)
    torch.testing.assert_close(curvature.hessian(model, loader).matvec(v),
                               curvature.hessian(model, (x, y)).matvec(v))


def test_to_scipy_eigsh_agrees_with_lanczos(problem):
    model, x, y = problem
    op = curvature.hessian(model, (x, y))
    values = np.sort(eigsh(op.to_scipy(), k=3, which="LA", tol=1e-10)[0])[::-1]
    spectrum = curvature.top_eigenvalues(op, k=3, tol=1e-8)
    np.testing.assert_allclose(spectrum.values.numpy(), values, rtol=1e-8)
    assert spectrum.matvecs < op.matvecs


def test_spectrum_direction_and_serialisation(problem):
    model, x, y = problem
    spectrum = curvature.top_eigenvalues(model, (x, y), k=2, param_filter="3")
    d = spectrum.direction(0, like=model)
    assert set(d) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert float(d["1.weight"].abs().sum()) == 0.0
    flat = torch.cat([d["3.weight"].reshape(-1), d["3.bias"]])
    torch.testing.assert_close(flat, spectrum.vectors[0])
    record = json.loads(json.dumps(spectrum.to_dict()))
    assert record["curvature"] == "hessian" and len(record["values"]) == 2
    assert spectrum.plot() is not None


def test_trace_density_overlap_results_serialise_and_plot(problem):
    model, x, y = problem
    op = curvature.hessian(model, (x, y))
    results = [curvature.trace(op, rtol=0.5), curvature.density(op, runs=2, steps=6),
               curvature.gradient_overlap(op, k=3)]
    for result in results:
        json.dumps(result.to_dict())
        assert result.plot() is not None
    with pytest.raises(ConfigError, match="method"):
        curvature.trace(op, method="exact")
