"""Kendall τ_b against scipy, the granulated τ against an explicit enumeration of groups."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kendalltau

from ridgeline.sweep.correlation import (
    bootstrap_granulated,
    bootstrap_tau,
    correlate,
    granulated_tau,
    kendall_tau,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(-3, 3, allow_nan=False)),
                min_size=2, max_size=40))
def test_kendall_tau_b_equals_scipy_with_ties(pairs):
    x = [float(a) for a, _ in pairs]  # small integers: many ties
    y = [round(b, 1) for _, b in pairs]
    expected = kendalltau(x, y, variant="b").statistic
    got = kendall_tau(x, y)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_b_equals_scipy_beyond_one_block():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=1300).astype(float)  # 1300 > one 512-row block, with ties
    y = x + rng.normal(scale=20, size=x.size)
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


def _grid_models(rng):
    models = []
    for lr, bs, seed in itertools.product([0.01, 0.1, 1.0], [32, 256], [0, 1]):
        models.append({"settings": {"lr": lr, "bs": bs, "seed": seed},
                       "measure": rng.normal(), "gap": rng.normal()})
    return models


def test_granulated_tau_matches_explicit_groups_with_scipy():
    rng = np.random.default_rng(1)
    models = _grid_models(rng)
    x = [m["measure"] for m in models]
    y = [m["gap"] for m in models]
    settings_ = [m["settings"] for m in models]
    # Truth: for each axis, enumerate every combination of the other settings explicitly.
    psi = {}
    values = {"lr": [0.01, 0.1, 1.0], "bs": [32, 256], "seed": [0, 1]}
    for axis in ("lr", "bs"):
        others = [k for k in values if k != axis]
        taus = []
        for combo in itertools.product(*(values[k] for k in others)):
            group = [m for m in models if all(m["settings"][k] == v for k, v in zip(others, combo))]
            taus.append(kendalltau([m["measure"] for m in group], [m["gap"] for m in group]).statistic)
        psi[axis] = float(np.mean(taus))
    result = granulated_tau(x, y, settings_, ["lr", "bs"])
    assert result["per_axis"]["lr"]["tau"] == pytest.approx(psi["lr"])
    assert result["per_axis"]["bs"]["tau"] == pytest.approx(psi["bs"])
    assert result["per_axis"]["lr"]["groups"] == 4 and result["per_axis"]["bs"]["groups"] == 6
    assert result["tau"] == pytest.approx((psi["lr"] + psi["bs"]) / 2)


def test_bootstrap_intervals_are_degenerate_for_a_perfect_ranking_and_cover_tau():
    x = np.arange(12.0)
    assert bootstrap_tau(x, 2 * x + 1, resamples=200) == [1.0, 1.0]
    rng = np.random.default_rng(2)
    y = x + rng.normal(scale=4, size=x.size)
    low, high = bootstrap_tau(x, y, resamples=400, confidence=0.9)
    assert low < kendalltau(x, y).statistic < high
    models = _grid_models(rng)
    boot = bootstrap_granulated([m["measure"] for m in models], [m["gap"] for m in models],
                                [m["settings"] for m in models], ["lr", "bs"], resamples=300)
    gran = granulated_tau([m["measure"] for m in models], [m["gap"] for m in models],
                          [m["settings"] for m in models], ["lr", "bs"])
    assert boot["interval"][0] <= gran["tau"] <= boot["interval"][1]
    for axis in ("lr", "bs"):
        assert boot["per_axis"][axis][0] <= gran["per_axis"][axis]["tau"] <= boot["per_axis"][axis][1]


def test_correlate_uses_only_models_that_have_the_measure():
    models = [{"settings": {"lr": i % 2, "seed": i // 2}, "gaps": {"error": float(i)},
               "measures": {"a": float(i), **({"b": float(-i)} if i < 3 else {})}}
              for i in range(6)]
    out = correlate(models, ["lr"], resamples=50)
    assert out["a"]["error"]["tau"] == pytest.approx(1.0) and out["a"]["error"]["n"] == 6
    assert out["b"]["error"]["tau"] == pytest.approx(-1.0) and out["b"]["error"]["n"] == 3
    assert out["a"]["error"]["granulated"] == pytest.approx(1.0)
