"""The warm-started assignment solver and the incremental cost terms of weight matching,
against scipy's dense ``linear_sum_assignment`` and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ridgeline.connectivity.alignment import _CostMatrices
from ridgeline.connectivity.assignment import solve_assignment
from ridgeline.connectivity.permutation_spec import PermutationSpec
from ridgeline.errors import ShapeMismatchError


def _dense(cost):
    return linear_sum_assignment(cost, maximize=True)[1]


def _value(cost, cols):
    return float(cost[np.arange(len(cols)), cols].sum())


@pytest.mark.parametrize("n", [1, 2, 7, 60, 200])
def test_cold_and_any_potentials_give_scipys_dense_assignment_on_random_matrices(n):
    rng = np.random.default_rng(n)
    for trial in range(3):
        cost = rng.normal(size=(n, n)) * 10.0 ** rng.integers(-3, 4)
        truth = _dense(cost)
        cols, _ = solve_assignment(cost)
        assert np.array_equal(cols, truth)
        # arbitrary (even absurd) potentials and starts change the speed, never the optimum
        for potentials in (rng.normal(size=n) * 1e3, np.zeros(n), -cost.max(0)):
            cols, _ = solve_assignment(cost, potentials, rng.permutation(n))
            assert np.array_equal(cols, truth), trial


def test_a_chain_of_perturbed_matrices_warm_started_matches_the_dense_solver():
    """As in weight matching: each matrix is the last one plus a low-rank change, solved
    from the potentials the previous solve returned."""
    rng = np.random.default_rng(0)
    n = 128
    a, b = rng.normal(size=(n, 3 * n)), rng.normal(size=(n, 3 * n))
    cost, potentials, cols = a @ b.T, None, None
    for step in range(12):
        cols, potentials = solve_assignment(cost, potentials, cols)
        assert np.array_equal(cols, _dense(cost)), step
        moved = rng.choice(3 * n, size=int(rng.integers(1, n)), replace=False)
        cost = cost + a[:, moved] @ rng.normal(size=(n, moved.size)).T


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_tiny_problems_equal_brute_force(n):
    rng = np.random.default_rng(100 + n)
    for _ in range(5):
        cost = rng.normal(size=(n, n))
        best = max(itertools.permutations(range(n)), key=lambda p: _value(cost, np.array(p)))
        cols, potentials = solve_assignment(cost)
        assert cols.tolist() == list(best)
        cols, _ = solve_assignment(cost + rng.normal(size=(n, n)) * 0.1, potentials, cols)
        again, _ = solve_assignment(cost, potentials, cols)
        assert again.tolist() == list(best)


@pytest.mark.parametrize("kind", ["integers", "duplicate columns", "rank one", "constant"])
def test_matrices_with_ties_reach_the_dense_optimum_value_exactly(kind):
    """With several optimal assignments any of them may be returned; its value must be the
    dense solver's (exactly: these costs are small integers or exact products)."""
    rng = np.random.default_rng(7)
    n = 40
    if kind == "integers":
        cost = rng.integers(0, 4, size=(n, n)).astype(float)
    elif kind == "duplicate columns":
        cost = rng.integers(-5, 5, size=(n, n // 4)).astype(float).repeat(4, axis=1)
    elif kind == "rank one":
        cost = np.outer(rng.integers(1, 5, size=n), rng.integers(1, 5, size=n)).astype(float)
    else:
        cost = np.full((n, n), 3.0)
    truth = _value(cost, _dense(cost))
    potentials, cols = None, None
    for _ in range(3):
        cols, potentials = solve_assignment(cost, potentials, cols)
        assert sorted(cols.tolist()) == list(range(n))
        assert _value(cost, cols) == truth


def test_a_non_square_matrix_is_refused_and_an_empty_one_is_solved():
    with pytest.raises(ShapeMismatchError, match="square"):
        solve_assignment(np.zeros((3, 4)))
    cols, potentials = solve_assignment(np.zeros((0, 0)), np.zeros(0), np.zeros(0, int))
    assert cols.size == 0 and potentials.size == 0


@pytest.mark.parametrize("changed", [2, 5, 8])
def test_incrementally_updated_cost_matrix_equals_the_fresh_product(changed):
    """A cost matrix updated for a few moved units of another permutation equals the one
    computed from scratch (float64 weights: to round-off), several updates in a row, for a
    conv weight with permutations on two axes plus a bias (a term that never changes)."""
    gen = torch.Generator().manual_seed(changed)
    shapes = {"w": (16, 12, 5), "b": (12,)}
    side_a = {k: torch.randn(*v, dtype=torch.float64, generator=gen) for k, v in shapes.items()}
    side_b = {k: torch.randn(*v, dtype=torch.float64, generator=gen) for k, v in shapes.items()}
    spec = PermutationSpec({"P0": 16, "P1": 12}, {"w": ("P0", "P1", None), "b": ("P1",)})
    costs = _CostMatrices(side_a, side_b, spec, spec.perm_to_axes(list(shapes)))
    perms = {"P0": torch.randperm(16, generator=gen), "P1": torch.arange(12)}

    def fresh():
        w_b = side_b["w"].index_select(0, perms["P0"])
        flat_a = side_a["w"].movedim(1, 0).reshape(12, -1)
        return flat_a @ w_b.movedim(1, 0).reshape(12, -1).T + torch.outer(side_a["b"], side_b["b"])

    assert torch.allclose(costs.matrix("P1", perms), fresh(), rtol=0, atol=1e-12)
    for _ in range(4):
        moved = torch.randperm(16, generator=gen)[:changed]
        new = perms["P0"].clone()
        new[moved] = perms["P0"][moved[torch.randperm(changed, generator=gen)]]
        perms["P0"] = new
        assert torch.allclose(costs.matrix("P1", perms), fresh(), rtol=0, atol=1e-12)
