"""Curvature operators, spectra, traces, densities and gradient overlap against explicit
matrices: torch.autograd.functional.hessian / jacobian of the loss as a function of the flat
parameter vector, on tiny MLPs and a tiny CNN (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian as explicit_hessian
from torch.autograd.functional import jacobian as explicit_jacobian
from torch.func import functional_call
from torch.nn import functional as F

from ridgeline import curvature
from ridgeline.errors import ConfigError
from ridgeline.models import cnn1d, mlp

F64 = torch.float64


def _problem(kind: str = "mlp", n: int = 23, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model = mlp(5, [6], 3, activation="tanh").double()
        x = torch.randn(n, 5, generator=gen, dtype=F64)
    elif kind == "deep":
        model = mlp(4, [5, 4], 3, activation="tanh").double()
        x = torch.randn(n, 4, generator=gen, dtype=F64)
    else:
        model = cnn1d(1, channels=(3, 4), out_features=3, activation="tanh").double()
        x = torch.randn(n, 8, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model.eval(), x, y


def _flat(model):
    """(θ, f(θ) -> outputs) with θ the flat parameter vector."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(flat, x):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            params[name] = flat[offset:offset + size].view(shape)
            offset += size
        return functional_call(model, params, (x,))

    return theta, outputs


def _explicit_hessian(model, x, y):
    theta, outputs = _flat(model)
    return explicit_hessian(lambda t: F.cross_entropy(outputs(t, x), y), theta)


@pytest.mark.parametrize("kind", ["mlp", "deep", "cnn"])
@pytest.mark.parametrize("batch_size", [None, 5])  # 23 = 4·5 + 3: an uneven last batch
def test_hessian_products_match_explicit_hessian(kind, batch_size):
    model, x, y = _problem(kind)
    h = _explicit_hessian(model, x, y)
    op = curvature.hessian(model, (x, y), batch_size=batch_size)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(op.shape[0], 3, generator=gen, dtype=F64)
    torch.testing.assert_close(op.matvec(v[:, 0]), h @ v[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(v), h @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(), h, rtol=1e-10, atol=1e-12)


def test_cached_and_recomputed_products_agree():
    model, x, y = _problem("mlp")
    cached = curvature.hessian(model, (x, y))
    fresh = curvature.hessian(model, (x, y), cache=False)
    v = torch.randn(cached.shape[0], dtype=F64)
    torch.testing.assert_close(cached.matvec(v), fresh.matvec(v), rtol=1e-12, atol=1e-14)
    assert cached._cache() is not None and fresh._cache() is None


def test_ggn_equals_jt_h_j_from_explicit_jacobians_and_is_psd():
    model, x, y = _problem("deep")
    theta, outputs = _flat(model)
    jac = explicit_jacobian(lambda t: outputs(t, x), theta)            # (n, O, P)
    out = outputs(theta, x).detach()
    h_out = explicit_hessian(lambda o: F.cross_entropy(o, y), out)   # (n, O, n, O)
    n, o, p = jac.shape
    expected = jac.reshape(n * o, p).T @ h_out.reshape(n * o, n * o) @ jac.reshape(n * o, p)
    for batch_size in (None, 5):
        dense = curvature.ggn(model, (x, y), batch_size=batch_size).dense()
        torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(expected).min() > -1e-12
    top = curvature.top_eigenvalues(model, (x, y), k=3, curvature="ggn", tol=1e-8)
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(expected).flip(0)[:3],
                               rtol=1e-8, atol=1e-10)


def test_ggn_equals_hessian_for_a_linear_model_with_mse():
    gen = torch.Generator().manual_seed(2)
    model = mlp(4, [], 2).double()
    x, y = torch.randn(17, 4, generator=gen, dtype=F64), torch.randn(17, 2, generator=gen, dtype=F64)
    torch.testing.assert_close(curvature.ggn(model, (x, y), loss="mse").dense(),
                               curvature.hessian(model, (x, y), loss="mse").dense())


def test_empirical_fisher_equals_mean_outer_product_of_example_gradients():
    model, x, y = _problem("mlp")
    theta, outputs = _flat(model)
    per_example = explicit_jacobian(
        lambda t: F.cross_entropy(outputs(t, x), y, reduction="none"), theta)   # (n, P)
    expected = per_example.T @ per_example / x.shape[0]
    for batch_size in (None, 5):
        dense = curvature.fisher(model, (x, y), batch_size=batch_size).dense()
        torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)


def test_param_filter_gives_the_diagonal_block():
    model, x, y = _problem("mlp")
    h = _explicit_hessian(model, x, y)
    sizes = [p.numel() for p in model.parameters()]           # 1.weight, 1.bias, 3.weight, 3.bias
    start = sizes[0] + sizes[1]
    op = curvature.hessian(model, (x, y), param_filter="3")
    assert op.param_names == ("3.weight", "3.bias")
    torch.testing.assert_close(op.dense(), h[start:, start:], rtol=1e-10, atol=1e-12)
    by_callable = curvature.hessian(model, (x, y), param_filter=lambda name, t: t.dim() == 1)
    assert by_callable.param_names == ("1.bias", "3.bias")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_top_eigenpairs_match_explicit_hessian(kind):
    model, x, y = _problem(kind)
    values, vectors = torch.linalg.eigh(_explicit_hessian(model, x, y))
    spectrum = curvature.top_eigenvalues(model, (x, y), k=3, tol=1e-6)
    assert spectrum.converged
    torch.testing.assert_close(spectrum.values, values.flip(0)[:3], rtol=1e-8, atol=1e-10)
    overlaps = (spectrum.vectors @ vectors.flip(1)[:, :3]).abs().diagonal()
    torch.testing.assert_close(overlaps, torch.ones(3, dtype=F64), atol=1e-6, rtol=0)
    true_residuals = (spectrum.vectors @ _explicit_hessian(model, x, y)
                      - spectrum.values[:, None] * spectrum.vectors).norm(dim=1)
    assert bool((true_residuals <= 1e-6 * spectrum.values.abs() + 1e-12).all())


@pytest.mark.parametrize("batch_size", [None, 5])  # recorded graph, and batches
def test_operator_gradient_equals_autograd_gradient(batch_size):
    """The gradient Lanczos starts from: read off the recorded graph (one batch) or
    evaluated (several batches), against autograd of the flat-vector loss."""
    model, x, y = _problem("deep")
    theta, outputs = _flat(model)
    theta.requires_grad_(True)
    (truth,) = torch.autograd.grad(F.cross_entropy(outputs(theta, x), y), theta)
    op = curvature.hessian(model, (x, y), batch_size=batch_size)
    torch.testing.assert_close(op.gradient(), truth, rtol=1e-10, atol=1e-13)
    block = curvature.hessian(model, (x, y), param_filter="3")  # the 5 → 4 layer
    assert block.param_names == ("3.weight", "3.bias")
    torch.testing.assert_close(block.gradient(), truth[4 * 5 + 5:][:5 * 4 + 4],
                               rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("start", ["gradient", "random"])
def test_both_lanczos_starts_find_the_explicit_top_eigenvalues(start):
    model, x, y = _problem("deep")
    values = torch.linalg.eigvalsh(_explicit_hessian(model, x, y)).flip(0)
    spectrum = curvature.top_eigenvalues(model, (x, y), k=3, tol=1e-7, start=start)
    assert spectrum.converged
    torch.testing.assert_close(spectrum.values, values[:3], rtol=1e-9, atol=1e-11)
    with pytest.raises(ConfigError, match="start"):
        curvature.top_eigenvalues(model, (x, y), start="ones")


def test_smallest_eigenvalue_is_the_most_negative_curvature():
    model, x, y = _problem("deep")
    values = torch.linalg.eigvalsh(_explicit_hessian(model, x, y))
    assert values[0] < 0
    spectrum = curvature.top_eigenvalues(model, (x, y), k=2, which="smallest", tol=1e-6)
    torch.testing.assert_close(spectrum.values, values[:2], rtol=1e-7, atol=1e-10)


def test_trace_estimates_contain_the_exact_trace():
    model, x, y = _problem("deep")
    exact = torch.trace(_explicit_hessian(model, x, y)).item()
    for method in ("hutchinson", "hutch++"):
        result = curvature.trace(model, (x, y), method=method, rtol=0.05, max_matvecs=3000,
                                 rank=8 if method == "hutch++" else None, block_size=16)
        assert result.converged and abs(result.value - exact) <= 4 * result.stderr, method
    full = curvature.trace(model, (x, y), method="hutch++", rank=10_000, max_matvecs=30_000)
    assert full.value == pytest.approx(exact, rel=1e-10) and full.stderr == 0.0


def test_density_moments_match_explicit_eigenvalues():
    model, x, y = _problem("mlp")
    eig = torch.linalg.eigvalsh(_explicit_hessian(model, x, y))
    result = curvature.density(model, (x, y), runs=200, steps=10, seed=3)
    for p in (1, 2, 3):
        per_run = (result.weights * result.nodes ** p).sum(dim=1)
        stderr = per_run.std().item() / np.sqrt(per_run.numel())
        assert abs(result.moment(p) - (eig ** p).mean().item()) <= 4 * stderr, p
    exact = curvature.density(model, (x, y), runs=1, steps=10_000)   # steps capped at P
    nodes = exact.nodes[0][exact.weights[0] > 1e-12]
    # Lanczos sees each distinct eigenvalue once: the nodes are the distinct eigenvalues
    assert (nodes[:, None] - eig[None, :]).abs().min(dim=1).values.max() < 1e-8
    assert (nodes[:, None] - eig[None, :]).abs().min(dim=0).values.max() < 1e-8


def test_gradient_overlap_matches_explicit_projection():
    model, x, y = _problem("mlp")
    values, vectors = torch.linalg.eigh(_explicit_hessian(model, x, y))
    theta, outputs = _flat(model)
    g = explicit_jacobian(lambda t: F.cross_entropy(outputs(t, x), y), theta)
    top = vectors.flip(1)[:, :4]
    expected = ((top.T @ g) ** 2).sum().item() / (g @ g).item()
    result = curvature.gradient_overlap(model, (x, y), k=4, tol=1e-8)
    assert result.value == pytest.approx(expected, rel=1e-6)
    everything = curvature.gradient_overlap(model, (x, y), k=theta.numel(), tol=1e-6)
    assert everything.value == pytest.approx(1.0, rel=1e-6)


def _relu_problem(inplace: bool, n: int = 19):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=inplace),
                                torch.nn.Linear(6, 5), torch.nn.ReLU(inplace=inplace),
                                torch.nn.Linear(5, 3)).double().eval()
    x = torch.randn(n, 4, generator=gen, dtype=F64)
    return model, x, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_hessian_products_match_explicit_hessian(inplace):
    # the recorded graph holds each ReLU's mask constant (no zero branch); the products
    # must still equal the explicit Hessian and forward-over-reverse (cache=False)
    model, x, y = _relu_problem(inplace)
    h = _explicit_hessian(model, x, y)
    cached = curvature.hessian(model, (x, y))
    fresh = curvature.hessian(model, (x, y), cache=False)
    v = torch.randn(cached.shape[0], 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    for j in range(v.shape[1]):
        torch.testing.assert_close(cached.matvec(v[:, j]), h @ v[:, j], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fresh.matvec(v[:, j]), h @ v[:, j], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cached.matmat(v), h @ v, rtol=1e-10, atol=1e-12)
    # the recorded graph (the path of models that are not plain chains) agrees too
    from ridgeline.curvature.operators import _RecordedGradient

    recorded = _RecordedGradient(cached.objective, cached._fixed, cached._params, x, y)
    product = recorded(cached.unflatten(v[:, 0]))
    torch.testing.assert_close(torch.cat([product[n].reshape(-1) for n in cached.param_names]),
                               h @ v[:, 0], rtol=1e-10, atol=1e-12)
    # the gradient read off the recording is still ∇L
    theta, outputs = _flat(model)
    g = torch.func.grad(lambda t: F.cross_entropy(outputs(t, x), y))(theta)
    torch.testing.assert_close(cached.gradient(), g, rtol=1e-12, atol=1e-14)


def test_recorded_relu_gradient_has_no_zero_branch():
    from ridgeline.curvature.operators import _RecordedGradient

    model, x, y = _relu_problem(False)
    op = curvature.hessian(model, (x, y))  # a plain chain: its products take R-operator sweeps
    recorded = _RecordedGradient(op.objective, op._fixed, op._params, x, y)  # other models'
    names, stack, seen = set(), [g.grad_fn for _, g in recorded.outputs], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(child for child, _ in node.next_functions)
    # threshold_backward would appear as ThresholdBackwardBackward0 (with a zero branch)
    assert "ThresholdBackwardBackward0" not in names and "MulBackward0" in names
