"""merge() against the formulas, computed here with plain torch loops (no ridgeline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ridgeline.connectivity import permutation_spec, permute_model
from ridgeline.errors import ArchitectureMismatchError, ConfigError, DataError
from ridgeline.merge import fisher_diagonal, merge
from ridgeline.models import mlp


def _models(count, seed=0, widths=(6, 5)):
    torch.manual_seed(seed)
    return [mlp(4, list(widths), 3, activation="tanh").double() for _ in range(count)]


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _data(n=17, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _loop_fisher(model, x, y, kind):
    """F by a Python loop over examples (and classes): the definition, one autograd call each."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        logp = torch.log_softmax(model(x[i:i + 1])[0], dim=0)
        classes = range(logp.numel()) if kind == "exact" else [int(y[i])]
        for c in classes:
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            weight = float(logp[c].detach().exp()) if kind == "exact" else 1.0
            for t, g in zip(total, grads):
                t += weight * g ** 2
    names = [k for k, _ in model.named_parameters()]
    return {k: t / x.shape[0] for k, t in zip(names, total)}


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_diagonal_matches_per_example_autograd_loop(kind):
    model, = _models(1)
    x, y = _data()
    truth = _loop_fisher(model, x, y, kind)
    for chunk in (None, 4):
        ours = fisher_diagonal(model, (x, y), kind=kind, chunk_size=chunk, batch_size=5)
        for k in truth:
            torch.testing.assert_close(ours[k], truth[k], rtol=1e-10, atol=1e-12)


def test_exact_fisher_of_softmax_regression_matches_closed_form():
    # f(x) = Wx: ∂ log p_c/∂W = (e_c − p) xᵀ, so F_W = mean_x Σ_c p_c (e_c − p)² ⊗ x²
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 3, bias=False).double()
    x, y = _data(11)
    p = torch.softmax(x @ model.weight.detach().T, dim=1)                  # (N, C)
    diff = torch.eye(3, dtype=torch.float64)[None] - p[:, None, :]       # (N, c, k)
    per_row = (p[:, :, None] * diff ** 2).sum(1)                          # (N, k)
    closed = (per_row[:, :, None] * x[:, None, :] ** 2).mean(0)
    torch.testing.assert_close(fisher_diagonal(model, (x, y))["weight"], closed)


def test_fisher_merge_matches_elementwise_formula():
    models = _models(3, seed=1)
    x, y = _data(13, seed=2)
    weights = [0.2, 0.5, 0.3]
    fishers = [_loop_fisher(m, x, y, "empirical") for m in models]
    result = merge(models, method="fisher", fisher="empirical", data=(x, y), weights=weights)
    merged = _params(result.model)
    for k in merged:
        num = sum(w * f[k] * _params(m)[k] for w, f, m in zip(weights, fishers, models))
        den = sum(w * f[k] for w, f in zip(weights, fishers))
        plain = sum(w * _params(m)[k] for w, m in zip(weights, models)) / sum(weights)
        expected = torch.where(den > 0, num / den, plain)
        torch.testing.assert_close(merged[k], expected, rtol=1e-9, atol=1e-12)


def test_weighted_average_matches_formula_and_leaves_inputs_unchanged():
    models = _models(3, seed=4)
    before = [_params(m) for m in models]
    result = merge(models, weights=[1.0, 2.0, 5.0])
    for k, v in _params(result.model).items():
        expected = (before[0][k] + 2 * before[1][k] + 5 * before[2][k]) / 8
        torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-14)
    for model, old in zip(models, before):
        for k, v in _params(model).items():
            assert torch.equal(v, old[k])
    assert result.weights == pytest.approx((1 / 8, 2 / 8, 5 / 8))
    assert result.to_dict()["weights"] == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    result.plot()


def test_task_arithmetic_matches_formula():
    base, *models = _models(3, seed=5)
    result = merge(models, method="task_arithmetic", base=base, scale=0.7, weights=[1.0, 0.5])
    b = _params(base)
    for k, v in _params(result.model).items():
        tau = [(_params(m)[k] - b[k]) for m in models]
        torch.testing.assert_close(v, b[k] + 0.7 * (tau[0] + 0.5 * tau[1]))


def _ties_numpy(base, taus, density, scale):
    """TIES (Yadav et al. 2023, Algorithm 1) in NumPy: trim by sorting, elect, disjoint mean."""
    trimmed = []
    for tau in taus:
        flat = tau.ravel().copy()
        k = math.ceil(density * flat.size)
        order = np.argsort(-np.abs(flat), kind="stable")
        flat[order[k:]] = 0.0
        trimmed.append(flat.reshape(tau.shape))
    trimmed = np.stack(trimmed)
    sign = np.sign(trimmed.sum(0))
    out = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        agree = [t[idx] for t in trimmed if t[idx] != 0 and np.sign(t[idx]) == sign[idx]]
        out[idx] = np.mean(agree) if agree else 0.0
    return base + scale * out


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_numpy_reference(density):
    base, *models = _models(4, seed=6)
    result = merge(models, method="ties", base=base, density=density, scale=0.9)
    b = _params(base)
    for k, v in _params(result.model).items():
        taus = [(_params(m)[k] - b[k]).numpy() for m in models]
        expected = _ties_numpy(b[k].numpy(), taus, density, 0.9)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_dare_keeps_rescaled_entries_and_is_unbiased():
    base, *models = _models(3, seed=7, widths=(32, 32))
    density = 0.5
    b = _params(base)
    taus = [{k: _params(m)[k] - b[k] for k in b} for m in models]
    expected = {k: b[k] + taus[0][k] + taus[1][k] for k in b}     # task arithmetic, scale 1
    draws = 300
    acc = {k: torch.zeros_like(v) for k, v in b.items()}
    for seed in range(draws):
        merged = _params(merge(models, method="dare", base=base, density=density,
                               seed=seed).model)
        for k in acc:
            acc[k] += merged[k]
    one = _params(merge(models, method="dare", base=base, density=density, seed=0).model)
    again = _params(merge(models, method="dare", base=base, density=density, seed=0).model)
    k = "3.weight"
    assert torch.equal(one[k], again[k])                            # seeded
    # single model: every entry of the merged task vector is 0 or τ/p
    solo = _params(merge(models[:1], method="dare", base=base, density=density, seed=1).model)
    change = solo[k] - b[k]
    rescaled = taus[0][k] / density
    assert bool(((change == 0) | torch.isclose(change, rescaled)).all())
    kept = float((change != 0).double().mean())
    assert abs(kept - density) < 0.1
    # E[θ_DARE] = task arithmetic: each entry's mean over draws within 5 standard errors
    for k in acc:
        mean = acc[k] / draws
        sd = torch.sqrt((taus[0][k] ** 2 + taus[1][k] ** 2) * (1 - density) / density / draws)
        assert bool(((mean - expected[k]).abs() <= 5 * sd + 1e-12).all()), k


@pytest.mark.parametrize("method", ["average", "fisher"])
def test_merging_a_model_with_itself_returns_it_exactly(method):
    model, = _models(1, seed=8)
    x, y = _data()
    result = merge([model, model, model], method=method, data=(x, y), weights=[0.3, 0.3, 0.4])
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_task_merge_of_a_model_with_itself_returns_it(method):
    base, model = _models(2, seed=9)
    result = merge([model, model], method=method, base=base, density=1.0, weights=[0.5, 0.5])
    for k, v in _params(result.model).items():
        torch.testing.assert_close(v, _params(model)[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["average", "fisher"])
def test_merge_of_permuted_copies_with_weight_alignment_returns_the_model_exactly(method):
    torch.manual_seed(10)
    model = mlp(6, [12, 10, 8], 3).double()
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(1)
    copies = [permute_model(model, spec, {p: torch.randperm(n, generator=gen)
                                          for p, n in spec.perms.items()}) for _ in range(3)]
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    result = merge(copies, method=method, align="weights", data=(x, y))
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, copies[0].state_dict()[k]), k
    assert result.details["merge_many_converged"]
    # the unaligned average of the same copies is a different network
    naive = merge(copies).model
    assert not torch.allclose(naive(x), model(x))


def test_activation_alignment_of_permuted_copies_returns_the_model():
    torch.manual_seed(11)
    model = mlp(6, [12, 10], 3, activation="tanh").double()
    spec = permutation_spec(model)
    other = permute_model(model, spec, {p: torch.randperm(n) for p, n in spec.perms.items()})
    x = torch.randn(100, 6, dtype=torch.float64)
    result = merge([model, other], align="activations", data=(x, torch.zeros(100).long()))
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_merged_batchnorm_statistics_are_reestimated_on_reset_data():
    torch.manual_seed(12)
    models = [mlp(4, [8], 3, norm="batch").double() for _ in range(2)]
    x = torch.randn(64, 4, dtype=torch.float64) * 3 + 1
    result = merge(models, reset_bn=(x, torch.zeros(64).long()))
    merged = result.model
    hidden = merged[1](x)  # pre-BN activations of the merged first layer
    torch.testing.assert_close(merged[2].running_mean, hidden.mean(0))
    torch.testing.assert_close(merged[2].running_var, hidden.var(0))


# ------------------------------------------------------------------------------ bad input
def test_models_of_different_architectures_name_the_tensor():
    a = mlp(4, [6], 3).double()
    b = mlp(4, [7], 3).double()
    with pytest.raises(ArchitectureMismatchError, match="1.weight"):
        merge([a, b])


def test_task_methods_need_a_base():
    models = _models(2)
    for method in ("task_arithmetic", "ties", "dare"):
        with pytest.raises(ConfigError, match="base"):
            merge(models, method=method)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(density):
    base, *models = _models(3)
    with pytest.raises(ConfigError, match="density"):
        merge(models, method="ties", base=base, density=density)


def test_fisher_without_data_is_rejected():
    with pytest.raises(DataError, match="data"):
        merge(_models(2), method="fisher")


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [1.0], [float("nan"), 1.0]])
def test_bad_weights_are_rejected(weights):
    with pytest.raises(ConfigError, match="weight"):
        merge(_models(2), weights=weights)


def test_unknown_method_and_alignment_are_rejected():
    with pytest.raises(ConfigError, match="method"):
        merge(_models(2), method="median")
    with pytest.raises(ConfigError, match="align"):
        merge(_models(2), align="kernels")
    with pytest.raises(DataError, match="activation"):
        merge(_models(2), align="activations")


def test_fisher_merge_with_one_data_set_per_model_uses_each_models_own_data():
    models = _models(2, seed=13)
    (x1, y1), (x2, y2) = _data(9, seed=1), _data(12, seed=2)
    f1 = _loop_fisher(models[0], x1, y1, "exact")
    f2 = _loop_fisher(models[1], x2, y2, "exact")
    result = merge(models, method="fisher", data=[(x1, y1), (x2, y2)])
    for k, v in _params(result.model).items():
        a, b = _params(models[0])[k], _params(models[1])[k]
        torch.testing.assert_close(v, (f1[k] * a + f2[k] * b) / (f1[k] + f2[k]))
    with pytest.raises(DataError, match="one data set per model"):
        merge(models, method="fisher", data=[(x1, y1)] * 3)


def test_repair_sets_each_hidden_layer_to_the_weighted_mean_of_the_models_statistics():
    torch.manual_seed(14)
    models = [mlp(4, [9, 7], 3).double() for _ in range(3)]
    x = torch.randn(80, 4, dtype=torch.float64)
    weights = [0.5, 0.3, 0.2]
    result = merge(models, weights=weights, repair=True, data=(x, torch.zeros(80).long()))
    net = result.model

    def pre_activations(model):
        z1 = x @ model[1].weight.T + model[1].bias
        z2 = torch.relu(z1) @ model[3].weight.T + model[3].bias
        return z1.detach(), z2.detach()

    layers = [pre_activations(m) for m in models]
    merged = pre_activations(net)
    for depth in range(2):
        mean = sum(w * z[depth].mean(0) for w, z in zip(weights, layers))
        std = sum(w * z[depth].std(0, unbiased=False) for w, z in zip(weights, layers))
        torch.testing.assert_close(merged[depth].mean(0), mean)
        torch.testing.assert_close(merged[depth].std(0, unbiased=False), std)
    # the output layer is untouched: it equals the plain weighted average
    plain = merge(models, weights=weights).model
    torch.testing.assert_close(net[5].weight, plain[5].weight)
    with pytest.raises(DataError, match="REPAIR"):
        merge(models, repair=True)
