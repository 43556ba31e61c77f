"""Weight and activation matching against known permutations and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from ridgeline.connectivity import align, apply_permutations, permutation_spec, permute_model
from ridgeline.connectivity.alignment import model_state
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
    limited = align(model_a, model_b, max_iter=1, seed=0)
    assert limited.iterations == 1
    assert align(model_a, model_b, seed=0).permutations.keys() == result.permutations.keys()


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
    exact = align(model_a, model_b, seed=1)
    loose = align(model_a, model_b, seed=1, tol=0.05)
    assert loose.iterations <= exact.iterations
    trace = loose.objective_trace
    assert len(trace) == 1 or trace[-1] - trace[-2] < 0.05 * abs(trace[-2]) or loose.iterations == 100
