"""intrinsic_dimension: the search finds the threshold crossing of a known accuracy curve,
the result states its basis, and bad input fails before any training."""

from __future__ import annotations

import json

import pytest
import torch

from ridgeline.data import digits, gaussian_mixture
from ridgeline.errors import ConfigError, DataError
from ridgeline.models import mlp
from ridgeline.subspace import IntrinsicDimension, intrinsic_dimension
from ridgeline.subspace.intrinsic import _bisect


@pytest.fixture(scope="module")
def blobs():
    return gaussian_mixture(num_samples=240, num_classes=3, dim=6, seed=0)


def small_mlp():
    return mlp(6, [8], 3)


@pytest.mark.parametrize("crossing", [1, 2, 37, 137, 999])
def test_bisection_finds_the_exact_crossing_of_a_step_accuracy_curve(crossing):
    curve = lambda d: 0.95 if d >= crossing else 0.1  # noqa: E731 - a known monotone a(d)
    runs = {}

    def evaluate(d):
        runs.setdefault(d, [(curve(d), 0.0)])
        return runs[d][0][0]

    for d in (10, 100, 1000):
        evaluate(d)
    if crossing > 1000:
        return
    _bisect(evaluate, runs, target=0.5, tol=1e-9)
    passing = [d for d in runs if runs[d][0][0] >= 0.5]
    assert min(passing) == crossing
    assert len(runs) <= 3 + 12  # geometric bisection: O(log log) steps per decade


def test_grid_result_is_consistent_with_its_own_accuracies(blobs):
    result = intrinsic_dimension(small_mlp, blobs, dims=[1, 8, 59], epochs=2, seeds=2,
                                 projection="fastfood", lr=0.05, progress=False)
    assert result.dims == (1, 8, 59) and result.num_params == 6 * 8 + 8 + 8 * 3 + 3
    assert all(len(a) == 2 for a in result.accuracies) and len(result.baseline_accuracies) == 2
    assert result.baseline == pytest.approx(sum(result.baseline_accuracies) / 2)
    assert result.target == pytest.approx(0.9 * result.baseline)
    means = [sum(a) / 2 for a in result.accuracies]
    assert result.mean_accuracies == pytest.approx(means)
    expected = next((d for d, m in zip(result.dims, means) if m >= result.target), None)
    assert result.d_int90 == expected
    assert "90 % of the measured full-model train accuracy" in result.basis
    assert result.metric == "train accuracy" and result.baseline_kind == "measured"


def test_given_absolute_baseline_skips_the_full_model_and_states_the_basis(blobs):
    result = intrinsic_dimension(small_mlp, blobs, dims=[2, 30], baseline=1.0, threshold=0.5,
                                 epochs=2, projection="sparse", eval_data=blobs, progress=False)
    assert result.baseline_kind == "given" and result.baseline_accuracies == ()
    assert result.target == pytest.approx(0.5)
    assert result.basis.startswith("50 % absolute test accuracy")


def test_more_dimensions_reach_higher_accuracy_on_digits():
    train, test = digits("train").subset(600), digits("test")
    result = intrinsic_dimension(lambda: mlp(64, [32], 10), train, eval_data=test, dims=[2, 400],
                                 epochs=6, projection="sparse", search="grid", progress=False)
    low, high = result.mean_accuracies
    assert high > low + 0.3
    # measured: 0.04 at d = 2, 0.77 at d = 400 against the target 0.60 (90 % of 0.67)
    assert low < result.target <= high
    assert result.d_int90 == 400


def test_same_seed_gives_the_same_result(blobs):
    kwargs = dict(dims=[3, 9], epochs=2, projection="dense", baseline=0.9, progress=False)
    a = intrinsic_dimension(small_mlp, blobs, **kwargs)
    b = intrinsic_dimension(small_mlp, blobs, **kwargs)
    assert a.accuracies == b.accuracies and a.losses == b.losses


def test_a_model_instance_is_copied_not_trained(blobs):
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    intrinsic_dimension(model, blobs, dims=[5], epochs=1, progress=False)
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q)


def test_to_dict_is_json_safe_and_plot_draws_the_threshold_line(blobs):
    import matplotlib

    matplotlib.use("Agg")
    result = intrinsic_dimension(small_mlp, blobs, dims=[2, 20], epochs=1, baseline=0.5,
                                 projection="fastfood", progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["basis"] == result.basis and data["d_int90"] == result.d_int90
    ax = result.plot()
    assert any(abs(line.get_ydata()[0] - result.target) < 1e-12 for line in ax.get_lines())
    assert isinstance(result, IntrinsicDimension)


@pytest.mark.parametrize("kwargs,match", [
    ({"dims": [10, 500]}, "only D = 83"),
    ({"dims": [0, 5]}, "positive integers"),
    ({"dims": []}, "positive integers"),
    ({"threshold": 1.5}, "threshold"),
    ({"baseline": "best"}, "baseline must be"),
    ({"baseline": 0.0}, "given baseline"),
    ({"projection": "hadamard"}, "unknown projection"),
    ({"search": "random"}, "search must be"),
    ({"seeds": 0}, "seeds"),
    ({"lr": []}, "lr must be"),
    ({"lr": -0.1}, "lr must be"),
    ({"baseline_epochs": 0}, "baseline_epochs"),
])
def test_bad_options_are_rejected_before_training(blobs, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        intrinsic_dimension(small_mlp, blobs, **{"epochs": 1, "progress": False, **kwargs})


def test_dense_projection_over_the_memory_budget_fails_before_training(blobs):
    from ridgeline.errors import MemoryBudgetError

    with pytest.raises(MemoryBudgetError, match="d = 80 needs"):
        intrinsic_dimension(small_mlp, blobs, dims=[2, 80], projection="dense",
                            memory_budget=1000, progress=False)


def test_regression_targets_and_bad_model_fn_are_rejected(blobs):
    x = torch.randn(10, 6)
    with pytest.raises(DataError, match="classification accuracy"):
        intrinsic_dimension(small_mlp, (x, torch.randn(10, 3)), dims=[2], progress=False)
    with pytest.raises(ConfigError, match="model_fn"):
        intrinsic_dimension(42, blobs, dims=[2], progress=False)
    with pytest.raises(ConfigError, match="must return a torch.nn.Module"):
        intrinsic_dimension(lambda: "mlp", blobs, dims=[2], progress=False)


def test_several_learning_rates_keep_the_best_run_of_each(blobs):
    kwargs = dict(dims=[3, 20], epochs=2, projection="sparse", baseline=0.9, progress=False)
    a = intrinsic_dimension(small_mlp, blobs, lr=0.003, **kwargs)
    b = intrinsic_dimension(small_mlp, blobs, lr=0.1, **kwargs)
    both = intrinsic_dimension(small_mlp, blobs, lr=[0.003, 0.1], **kwargs)
    for i in range(2):
        best = max((a.accuracies[i][0], 0.003), (b.accuracies[i][0], 0.1), key=lambda t: t[0])
        assert both.accuracies[i][0] == best[0]
        assert both.learning_rates[i][0] == best[1]


def test_a_diverging_run_counts_as_zero_accuracy_with_a_warning(blobs):
    from ridgeline.errors import ConvergenceWarning

    with pytest.warns(ConvergenceWarning, match="diverged with lr=1e\\+30"):
        result = intrinsic_dimension(small_mlp, blobs, dims=[20], epochs=2, optimizer="sgd",
                                     lr=[1e30, 0.05], baseline=0.5, projection="dense",
                                     progress=False)
    assert result.learning_rates == ((0.05,),) and result.accuracies[0][0] > 0


@pytest.mark.slow
def test_d_int90_on_digits_varies_little_with_width():
    """Li et al. (2018): once a network solves the task, d_int90 barely depends on its size."""
    train, test = digits("train"), digits("test")
    found = {}
    for widths in ([32, 32], [128, 128]):
        result = intrinsic_dimension(lambda widths=widths: mlp(64, widths, 10), train,
                                     eval_data=test, dims=[30, 100, 300, 1000], epochs=15,
                                     lr=[1e-2, 3e-2], baseline_lr=[3e-3, 1e-2], baseline_epochs=30,
                                     projection="fastfood", search="bisect", tol=0.2,
                                     progress=False)
        found[result.num_params] = result.d_int90
    (small_d, small), (large_d, large) = sorted(found.items())
    assert large_d / small_d > 7
    assert small is not None and large is not None
    assert 1 / 2 <= large / small <= 2
