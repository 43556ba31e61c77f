"""align_many's choices (which tensors weight matching compares, MergeMany's stopping rule)
against ground truth built here: brute force over permutations, permuted copies of one
model, and MergeMany's own fixed-point condition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ridgeline.connectivity import apply_permutations, permutation_spec, permute_model
from ridgeline.connectivity.alignment import weight_matching
from ridgeline.errors import ConfigError
from ridgeline.merge import align_many, merge
from ridgeline.merge.alignment import matched_tensors
from ridgeline.models import mlp


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _brute_force_perm(a, b, names):
    """argmax over all permutations P of the one hidden layer of Σ_k ⟨A_k, P(B_k)⟩, k in
    ``names``, written out for a one-hidden-layer MLP (0.weight rows, 0.bias, 2.weight cols)."""
    n = a["1.weight"].shape[0]
    best, arg = -np.inf, None
    for perm in itertools.permutations(range(n)):
        p = torch.tensor(perm)
        permuted = {"1.weight": b["1.weight"][p], "1.bias": b["1.bias"][p],
                    "3.weight": b["3.weight"][:, p], "3.bias": b["3.bias"]}
        value = sum(float((a[k] * permuted[k]).sum()) for k in names)
        if value > best:
            best, arg = value, p
    return arg


@pytest.mark.parametrize("matching", ["matrices", "all"])
def test_one_layer_weight_matching_equals_brute_force_over_all_permutations(matching):
    torch.manual_seed(0)
    model_a, model_b = mlp(3, [5], 2).double(), mlp(3, [5], 2).double()
    with torch.no_grad():  # large biases, so the two objectives disagree
        model_a[1].bias.copy_(torch.tensor([3.0, -2.0, 1.0, 0.5, -3.0]))
        model_b[1].bias.copy_(torch.tensor([-1.0, 2.5, 3.0, -2.0, 0.0]))
    a, b = _params(model_a), _params(model_b)
    names = (["1.weight", "3.weight"] if matching == "matrices"
             else ["1.weight", "1.bias", "3.weight", "3.bias"])
    expected = _brute_force_perm(a, b, names)
    other = _brute_force_perm(a, b, ["1.weight", "1.bias", "3.weight", "3.bias"]
                              if matching == "matrices" else ["1.weight", "3.weight"])
    assert not torch.equal(expected, other)  # the choice matters on this pair
    aligned = align_many([model_a, model_b], matching=matching)
    perm = next(iter(aligned.permutations[1].values()))
    assert torch.equal(perm, expected)


@pytest.mark.parametrize("matching", ["matrices", "all"])
@pytest.mark.parametrize("norm", [None, "layer"])
def test_permuted_copies_are_recovered_exactly_with_either_matching(matching, norm):
    torch.manual_seed(3)
    model = mlp(6, [12, 10, 8], 3, norm=norm).double()
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(4)
    copies = [permute_model(model, spec, {p: torch.randperm(n, generator=gen)
                                          for p, n in spec.perms.items()}) for _ in range(4)]
    result = merge(copies, align="weights", matching=matching)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, copies[0].state_dict()[k]), k
    assert result.details["merge_many_converged"]


def test_matrices_keep_every_weight_matrix_and_no_bias_or_norm_parameter():
    model = mlp(4, [6, 5], 3, norm="layer")
    params = dict(model.named_parameters())
    spec = permutation_spec(model)
    kept = matched_tensors(params, spec, "matrices")
    assert set(kept) == {k for k, v in params.items() if v.dim() == 2}
    assert matched_tensors(params, spec, "all") == list(params)


def test_a_permutation_acting_only_on_vectors_still_enters_the_cost():
    # a hand-written spec: permutation "Q" acts on a bias alone, so with "matrices" that
    # bias must stay in the cost (else Q could never be matched)
    class Spec:
        axes = {"w": ("P", None), "b": ("P",), "v": ("Q",)}

    params = {"w": torch.zeros(3, 2), "b": torch.zeros(3), "v": torch.zeros(4)}
    assert matched_tensors(params, Spec(), "matrices") == ["w", "v"]


def test_merge_many_ends_at_a_fixed_point_of_every_models_matching():
    # MergeMany's convergence condition, checked from outside: re-solving any model against
    # the mean of the others (matrices only) moves no unit
    torch.manual_seed(5)
    models = [mlp(5, [9, 7], 3).double() for _ in range(4)]
    result = align_many(models, seed=2)
    assert result.converged
    spec = permutation_spec(models[0])
    states = [{k: v for k, v in _params(m).items() if v.dim() == 2} for m in result.models]
    for i in range(len(models)):
        others = [s for j, s in enumerate(states) if j != i]
        mean = {k: sum(s[k] for s in others) / len(others) for k in states[0]}
        perms, _, converged = weight_matching(mean, states[i], spec, seed=7)
        assert converged
        for p, q in perms.items():
            assert torch.equal(q, torch.arange(q.numel())), p
        # and the aligned model is its original, permuted
        original = apply_permutations(_params(models[i]), spec, result.permutations[i])
        for k, v in _params(result.models[i]).items():
            assert torch.equal(v, original[k]), k


def test_bad_matching_and_tol_are_rejected_before_any_work():
    models = [mlp(4, [6], 3) for _ in range(3)]
    with pytest.raises(ConfigError, match="matching"):
        merge(models, align="weights", matching="biases")
    with pytest.raises(ConfigError, match="tol"):
        merge(models, align="weights", tol=-1.0)
    with pytest.raises(ConfigError, match="matching"):
        align_many(models, matching="everything")


def test_tol_stops_merge_many_no_later_than_exact_convergence():
    torch.manual_seed(6)
    models = [mlp(5, [16, 16], 3).double() for _ in range(3)]
    exact = align_many(models, seed=1)
    loose = align_many(models, seed=1, tol=0.5)
    assert exact.converged and loose.converged
    assert loose.rounds <= exact.rounds
    assert loose.rounds == 1  # a round never lowers the spread by half of itself here


def test_depth_weight_equals_brute_force_on_the_weighted_objective():
    # one hidden layer: objective ⟨W1_A, P W1_B⟩ + r⁻¹ ⟨W2_A, W2_B Pᵀ⟩ (matrices only),
    # maximised by enumerating every permutation
    torch.manual_seed(1)
    model_a, model_b = mlp(3, [5], 4).double(), mlp(3, [5], 4).double()
    a, b = _params(model_a), _params(model_b)
    found = {}
    for r in (1.0, 50.0):
        best, arg = -np.inf, None
        for perm in itertools.permutations(range(5)):
            p = torch.tensor(perm)
            value = (float((a["1.weight"] * b["1.weight"][p]).sum())
                     + float((a["3.weight"] * b["3.weight"][:, p]).sum()) / r)
            if value > best:
                best, arg = value, p
        aligned = align_many([model_a, model_b], depth_weight=r)
        found[r] = next(iter(aligned.permutations[1].values()))
        assert torch.equal(found[r], arg), r
    assert not torch.equal(found[1.0], found[50.0])  # the weighting matters on this pair


def test_permuted_copies_are_recovered_exactly_with_depth_weight():
    torch.manual_seed(7)
    model = mlp(6, [12, 10, 8], 3).double()
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(8)
    copies = [permute_model(model, spec, {p: torch.randperm(n, generator=gen)
                                          for p, n in spec.perms.items()}) for _ in range(3)]
    result = merge(copies, align="weights", depth_weight=2.0)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, copies[0].state_dict()[k]), k
    with pytest.raises(ConfigError, match="depth_weight"):
        merge(copies, align="weights", depth_weight=0.5)


@pytest.mark.parametrize("matching", ["matrices", "all"])
def test_permuted_copies_of_a_transformer_with_heads_are_recovered_exactly(matching):
    from ridgeline.connectivity.heads import StructuredState
    from ridgeline.models import transformer

    torch.manual_seed(0)
    model = transformer(40, 10, width=16, heads=4, depth=2).double().eval()
    x = torch.randn(3, 40, dtype=torch.float64)
    spec = permutation_spec(model, example_input=x)
    copies = []
    for seed in (1, 2, 3):  # random unit, head and within-head permutations
        state, g = StructuredState(spec), torch.Generator().manual_seed(seed)
        for p in state.free:
            state.free[p] = torch.randperm(spec.perms[p], generator=g)
        for k in state.sigma:
            state.sigma[k] = torch.randperm(len(state.sigma[k]), generator=g)
        for k, t in state.tau.items():
            state.tau[k] = torch.stack([torch.randperm(t.shape[1], generator=g)
                                        for _ in range(t.shape[0])])
        copies.append(permute_model(model, spec, state.flat()))
    result = merge(copies, align="weights", matching=matching)
    reference = dict(copies[0].named_parameters())
    for k, v in result.model.named_parameters():
        assert torch.equal(v, reference[k]), k
