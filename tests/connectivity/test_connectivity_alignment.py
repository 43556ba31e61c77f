"""Weight and activation matching against known permutations and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from ridgeline.connectivity import align, apply_permutations, permutation_spec, permute_model
from ridgeline.connectivity.alignment import activation_matching, model_state
from ridgeline.connectivity.permutation_spec import PermutationSpec
from ridgeline.errors import ArchitectureMismatchError, DataError, ShapeMismatchError
from ridgeline.models import cnn1d, mlp


def _random_perms(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=gen) for p, n in spec.perms.items()}


@pytest.mark.parametrize("factory", [lambda: mlp(10, [24, 20, 16], 3),
                                     lambda: cnn1d(channels=(8, 12), out_features=3)])
def test_weight_matching_recovers_a_known_random_permutation_exactly(factory):
    torch.manual_seed(0)
    model_a = factory().double()
    spec = permutation_spec(model_a)
    hidden = _random_perms(spec, 7)
    model_b = permute_model(model_a, spec, hidden)  # B = permuted A
    result = align(model_a, model_b, seed=3)
    aligned = model_state(result.model)
    for name, tensor in model_state(model_a).items():
        assert torch.equal(aligned[name], tensor), name
    for p, perm in hidden.items():  # unit i of aligned B = unit perm[i] of B = unit i of A
        assert torch.equal(hidden[p][result.permutations[p]], torch.arange(perm.numel()))
    assert result.converged
    assert result.objective_trace[-1] == pytest.approx(
        sum(float((t.detach().double() ** 2).sum()) for t in model_a.parameters()))


def test_activation_matching_recovers_a_known_random_permutation_exactly():
    torch.manual_seed(1)
    model_a = mlp(10, [24, 16], 3, activation="tanh").double()
    spec = permutation_spec(model_a)
    hidden = _random_perms(spec, 11)
    model_b = permute_model(model_a, spec, hidden)
    x = torch.randn(200, 10, dtype=torch.float64)
    result = align(model_a, model_b, method="activations", data=(x, torch.zeros(200).long()))
    for name, tensor in model_state(model_a).items():
        assert torch.equal(model_state(result.model)[name], tensor), name
    # every matched unit correlates perfectly with its twin
    assert result.objective_trace[0] == pytest.approx(24 + 16, abs=1e-8)


class _WithSpareHead(torch.nn.Module):
    """An MLP plus a head kept in the state but never used by forward."""

    def __init__(self):
        super().__init__()
        self.body = mlp(6, [8], 3, activation="tanh")
        self.spare = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.body(x)


def test_activation_matching_records_a_permutation_it_cannot_see_as_unmatched():
    torch.manual_seed(6)
    model_a = _WithSpareHead().double()
    spec = permutation_spec(model_a, example_input=torch.randn(2, 6, dtype=torch.float64))
    axes = {**spec.axes, "spare.weight": ("P_spare", None), "spare.bias": ("P_spare",)}
    manual = PermutationSpec({**spec.perms, "P_spare": 5}, axes)
    hidden = _random_perms(manual, 13)
    assert not torch.equal(hidden["P_spare"], torch.arange(5))
    model_b = permute_model(model_a, manual, hidden)
    x = torch.randn(100, 6, dtype=torch.float64)
    result = align(model_a, model_b, method="activations", data=(x, torch.zeros(100).long()),
                   spec=manual)
    (body,) = spec.perms
    assert torch.equal(hidden[body][result.permutations[body]], torch.arange(8))  # matched
    assert torch.equal(result.permutations["P_spare"], torch.arange(5))  # identity ...
    assert result.unmatched == ("P_spare",)  # ... and the result says so
    assert any("P_spare" in note and "identity" in note for note in result.notes)
    assert result.to_dict()["unmatched"] == ["P_spare"]
    with pytest.warns(RuntimeWarning, match="P_spare"):
        activation_matching(model_a, model_b, x, manual)
    by_weights = align(model_a, model_b, spec=manual)  # weights see the spare head
    assert by_weights.unmatched == ()
    assert torch.equal(hidden["P_spare"][by_weights.permutations["P_spare"]], torch.arange(5))


def test_weight_matching_with_one_permutation_is_the_brute_force_optimum():
    torch.manual_seed(2)
    model_a, model_b = mlp(3, [5], 2).double(), mlp(3, [5], 2).double()
    spec = permutation_spec(model_a)
    (name, size), = spec.perms.items()
    params_a = dict(model_a.named_parameters())
    params_b = dict(model_b.named_parameters())

    def objective(order):
        perms = {name: torch.tensor(order)}
        moved = apply_permutations({k: v.detach() for k, v in params_b.items()}, spec, perms)
        return sum(float((params_a[k].detach() * moved[k]).sum()) for k in params_a)

    best = max(itertools.permutations(range(size)), key=objective)
    result = align(model_a, model_b)
    assert result.permutations[name].tolist() == list(best)
    assert result.objective_trace[-1] == pytest.approx(objective(best))


def test_weight_matching_objective_never_decreases_and_stops_when_a_pass_improves_nothing():
    torch.manual_seed(3)
    model_a, model_b = mlp(8, [32, 32, 32], 4), mlp(8, [32, 32, 32], 4)
    result = align(model_a, model_b, seed=0)
    trace = [result.initial_objective, *result.objective_trace]
    assert all(b >= a - 1e-9 for a, b in zip(trace, trace[1:]))
    assert result.converged and result.objective_trace[-1] == pytest.approx(result.objective_trace[-2])
    assert result.iterations > 1  # so that one pass is a real cut
    limited = align(model_a, model_b, max_iter=1, seed=0)
    assert limited.iterations == 1 and not limited.converged
    assert limited.objective_trace[0] == result.objective_trace[0]  # the same first pass
    again = align(model_a, model_b, seed=0)  # same seed: the same permutations, unit by unit
    assert again.objective_trace == result.objective_trace
    for name, perm in result.permutations.items():
        assert torch.equal(again.permutations[name], perm), name


def test_alignment_result_dict_and_plot():
    import json

    torch.manual_seed(4)
    result = align(mlp(4, [6], 2), mlp(4, [6], 2))
    json.dumps(result.to_dict())
    assert result.plot() is not None


def test_different_architectures_are_refused_naming_the_tensors():
    with pytest.raises(ArchitectureMismatchError, match="1.weight"):
        align(mlp(4, [6], 2), mlp(4, [7], 2))


def test_activation_matching_needs_data_of_the_right_shape():
    model_a, model_b = mlp(4, [6], 2), mlp(4, [6], 2)
    with pytest.raises(DataError, match="needs data"):
        align(model_a, model_b, method="activations")
    with pytest.raises(ShapeMismatchError, match="inputs of shape"):
        align(model_a, model_b, method="activations", data=(torch.randn(5, 3), torch.zeros(5).long()))


def test_tolerance_stops_weight_matching_when_a_pass_gains_little():
    torch.manual_seed(5)
    model_a, model_b = mlp(8, [64, 64], 4), mlp(8, [64, 64], 4)
    tol = 0.05
    exact = align(model_a, model_b, seed=1)
    loose = align(model_a, model_b, seed=1, tol=tol)
    # same seed, same visiting order: the loose run follows the exact run pass by pass and
    # must stop at the first pass whose gain is below tol of the value before it
    trace = exact.objective_trace
    expected = next(i + 1 for i in range(1, len(trace))
                    if trace[i] - trace[i - 1] < tol * abs(trace[i - 1]))
    assert expected < exact.iterations  # the tolerance really cuts passes here
    assert loose.iterations == expected and loose.converged
    assert loose.objective_trace == trace[:expected]


def _reference_weight_matching(params_a, params_b, spec, seed, max_iter=100):
    """Git Re-Basin Algorithm 1 written out plainly: every permutation's cost matrix is
    rebuilt and solved on every visit (no reuse of any kind)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    names = list(params_a)
    groups = spec.perm_to_axes(names)
    perms = {p: torch.arange(n) for p, n in spec.perms.items()}
    order = [p for p in spec.perms if groups[p]]
    for _ in range(max_iter):
        improved = False
        for index in rng.permutation(len(order)):
            p = order[index]
            n = spec.perms[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for k, axis in groups[p]:
                w_b = params_b[k]
                for other_axis, other in enumerate(spec.axes[k]):
                    if other is not None and other_axis != axis:
                        w_b = w_b.index_select(other_axis, perms[other])
                w_a = params_a[k].movedim(axis, 0).reshape(n, -1)
                cost += (w_a @ w_b.movedim(axis, 0).reshape(n, -1).T).double()
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            old = float(cost[torch.arange(n), perms[p]].sum())
            if float(cost.numpy()[rows, cols].sum()) > old + 1e-12 * max(1.0, abs(old)):
                perms[p], improved = torch.as_tensor(cols, dtype=torch.long), True
        if not improved:
            break
    return perms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matching_equals_the_plain_algorithm_unit_by_unit(seed):
    """Reusing cost terms and skipping permutations whose cost matrix cannot have changed
    must give exactly the permutations of the plain algorithm (same seed, same order)."""
    torch.manual_seed(10 + seed)
    model_a, model_b = mlp(6, [12, 10, 8], 3).double(), mlp(6, [12, 10, 8], 3).double()
    spec = permutation_spec(model_a)
    state_a, state_b = model_state(model_a), model_state(model_b)
    truth = _reference_weight_matching(state_a, state_b, spec, seed)
    result = align(model_a, model_b, seed=seed)
    assert result.converged
    for name, perm in truth.items():
        assert torch.equal(result.permutations[name], perm), name


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("factory", [lambda: mlp(6, [48, 40, 32], 3),
                                     lambda: cnn1d(channels=(24, 20), out_features=3)])
def test_weight_matching_on_wider_models_equals_the_plain_algorithm(seed, factory):
    """Wide enough that later passes move few units (incremental cost terms, warm-started
    assignments): still the permutations of Git Re-Basin's Algorithm 1 written plainly."""
    torch.manual_seed(20 + seed)
    model_a, model_b = factory().double(), factory().double()
    spec = permutation_spec(model_a)
    truth = _reference_weight_matching(model_state(model_a), model_state(model_b), spec, seed)
    result = align(model_a, model_b, seed=seed)
    assert result.converged and result.iterations > 2
    for name, perm in truth.items():
        assert torch.equal(result.permutations[name], perm), name


def test_the_spec_is_traced_once_per_plain_architecture_and_equals_a_fresh_trace():
    from ridgeline.connectivity import alignment

    alignment._SPEC_CACHE.clear()
    torch.manual_seed(6)
    for factory in (lambda: mlp(5, [7, 6], 3), lambda: mlp(5, [7, 6], 3, norm="layer"),
                    lambda: mlp(5, [7, 6], 3, activation="tanh")):
        first, second = align(factory(), factory()), align(factory(), factory())
        fresh = permutation_spec(factory())
        for result in (first, second):
            assert result.spec.perms == fresh.perms and result.spec.axes == fresh.axes
        first.spec.perms.clear()  # a caller editing its spec does not touch the cache
        assert align(factory(), factory()).spec.perms == fresh.perms
    assert len(alignment._SPEC_CACHE) == 3  # tanh, layer norm: other architectures

    hooked = mlp(5, [7, 6], 3)
    hooked[1].register_forward_hook(lambda *args: None)
    x = torch.randn(2, 5)
    assert alignment._architecture_key(hooked, x) is None  # hooks may change the graph
    assert alignment._architecture_key(cnn1d(channels=(4,), out_features=2),
                                       torch.randn(2, 1, 16)) is None  # custom module
