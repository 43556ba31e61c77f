"""Linear paths and barriers against hand-built interpolated models; BN reset; REPAIR."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.nn import functional as F

from ridgeline import Objective
from ridgeline.connectivity import barrier, interpolate, reset_bn
from ridgeline.connectivity.paths import PathEngine
from ridgeline.errors import ArchitectureMismatchError, ConfigError, ShapeMismatchError
from ridgeline.models import mlp


@pytest.fixture
def pair():
    torch.manual_seed(0)
    a = mlp(5, [8, 6], 3, activation="tanh").double().eval()
    torch.manual_seed(1)
    b = mlp(5, [8, 6], 3, activation="tanh").double().eval()
    return a, b


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(37, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (37,), generator=gen)


def _by_hand(model_a, model_b, alpha, x, y):
    """Loss and accuracy of a model whose state is (1−α)A + αB, built without ridgeline."""
    model = copy.deepcopy(model_a)
    state_b = model_b.state_dict()
    model.load_state_dict({k: (1 - alpha) * v + alpha * state_b[k] if v.is_floating_point() else v
                           for k, v in model_a.state_dict().items()})
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean())


def test_every_point_is_the_directly_interpolated_model(pair, data):
    a, b = pair
    result = interpolate(a, b, data, points=5)
    assert result.alphas == (0.0, 0.25, 0.5, 0.75, 1.0)
    for alpha, loss, acc in zip(result.alphas, result.losses, result.accuracies):
        hand_loss, hand_acc = _by_hand(a, b, alpha, *data)
        assert loss == pytest.approx(hand_loss, abs=1e-12)
        assert acc == pytest.approx(hand_acc, abs=1e-12)


def test_path_endpoints_equal_the_endpoint_losses(pair, data):
    a, b = pair
    x, y = data
    result = interpolate(a, b, data, points=7)
    with torch.no_grad():
        assert result.losses[0] == pytest.approx(float(F.cross_entropy(a(x), y)), abs=1e-12)
        assert result.losses[-1] == pytest.approx(float(F.cross_entropy(b(x), y)), abs=1e-12)


def test_barrier_of_a_model_with_itself_is_zero(pair, data):
    a, _ = pair
    result = interpolate(a, copy.deepcopy(a), data, points=9)
    assert result.barrier == 0.0 and result.error_barrier == 0.0
    assert result.barrier_midpoint_convention == 0.0
    assert len(set(result.losses)) == 1


def test_barrier_conventions_on_a_known_curve():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    values = [1.0, 2.0, 2.5, 3.2, 3.0]
    b, b_mid, top = barrier(alphas, values)
    excess = [v - ((1 - a) * 1.0 + a * 3.0) for a, v in zip(alphas, values)]
    assert b == pytest.approx(max(excess)) == pytest.approx(0.7) and top == 0.75  # 3.2 − 2.5
    assert b_mid == pytest.approx(3.2 - 2.0)
    assert math.isnan(barrier(alphas, [1.0, float("nan"), 1, 1, 1])[0])
    assert barrier(alphas, [1.0, float("inf"), 1, 1, 1])[0] == math.inf


def test_nonfinite_losses_are_reported_not_replaced(pair, data):
    a, b = pair
    broken = copy.deepcopy(b)
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        result = interpolate(a, broken, data, points=5)
    assert math.isfinite(result.losses[0])
    assert all(math.isnan(v) for v in result.losses[1:])
    assert result.nonfinite_alphas == result.alphas[1:]
    assert math.isnan(result.barrier)
    json.dumps(result.to_dict())  # NaN becomes null


def test_refinement_adds_points_around_the_maximum(pair, data):
    a, b = pair
    coarse = interpolate(a, b, data, points=5)
    fine = interpolate(a, b, data, points=5, refine=2)
    assert set(coarse.alphas) < set(fine.alphas) and len(fine.alphas) <= 9
    assert fine.barrier >= coarse.barrier - 1e-12
    for alpha, loss in zip(fine.alphas, fine.losses):
        assert loss == pytest.approx(_by_hand(a, b, alpha, *data)[0], abs=1e-12)


def test_result_is_json_safe_and_plots(pair, data):
    result = interpolate(*pair, data, points=3, metrics=("loss",))
    assert result.accuracies is None and result.error_barrier is None
    json.dumps(result.to_dict())
    assert result.plot() is not None


def test_bad_input_is_refused(pair, data):
    a, _ = pair
    with pytest.raises(ArchitectureMismatchError, match="1.weight"):
        interpolate(a, mlp(5, [9, 6], 3).double(), data)
    with pytest.raises(ShapeMismatchError):
        interpolate(a, copy.deepcopy(a), (torch.randn(4, 7, dtype=torch.float64), torch.zeros(4).long()))


# ----------------------------------------------------------------------------- BatchNorm
def _bn_model(seed):
    torch.manual_seed(seed)
    return mlp(5, [6], 3, norm="batch").double().eval()


def test_bn_reset_statistics_equal_a_fresh_pass_over_the_data(data):
    model = _bn_model(0)
    x, y = data
    fresh = reset_bn(model, data, batch_size=10)  # batches of 10, 10, 10, 7
    linear = model[1]
    with torch.no_grad():
        pre = [linear(x[i:i + 10]) for i in range(0, 37, 10)]
    mean = torch.stack([p.mean(0) for p in pre]).mean(0)  # cumulative average (momentum=None)
    var = torch.stack([p.var(0, unbiased=True) for p in pre]).mean(0)
    torch.testing.assert_close(fresh[2].running_mean, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(fresh[2].running_var, var, atol=1e-12, rtol=0)
    assert int(fresh[2].num_batches_tracked) == 4
    one = reset_bn(model, data)  # one batch: the exact mean and unbiased variance
    with torch.no_grad():
        torch.testing.assert_close(one[2].running_var, linear(x).var(0), atol=1e-12, rtol=0)
    assert model[2].momentum == 0.1 and not model.training  # the model is untouched


def test_path_with_bn_reset_matches_hand_reset_models(data):
    a, b = _bn_model(0), _bn_model(1)
    result = interpolate(a, b, data, points=3, reset_bn=data)
    assert result.normalization == "bn-reset"
    for alpha, loss in zip(result.alphas, result.losses):
        mixed = copy.deepcopy(a)
        mixed.load_state_dict({k: (1 - alpha) * v + alpha * b.state_dict()[k]
                               if v.is_floating_point() else v for k, v in a.state_dict().items()})
        hand = reset_bn(mixed, data)
        with torch.no_grad():
            assert loss == pytest.approx(float(F.cross_entropy(hand(data[0]), data[1])), abs=1e-12)


def test_bn_models_without_reset_warn(data):
    with pytest.warns(UserWarning, match="reset_bn"):
        interpolate(_bn_model(0), _bn_model(1), data, points=3)


def test_repair_on_a_bn_model_needs_reset_bn_and_never_resets_on_the_evaluation_data(data):
    """REPAIR on a BatchNorm network is a BatchNorm reset; it must not quietly take its
    statistics from the data being evaluated (the test split)."""
    a, b = _bn_model(0), _bn_model(1)
    x, y = data
    train = (x[:20], y[:20])
    evaluation = (x[20:], y[20:])
    with pytest.raises(ConfigError, match="reset_bn=training_data"):
        interpolate(a, b, evaluation, points=3, repair=True)
    # with reset_bn= the statistics come from the training data: the midpoint equals a
    # hand-built midpoint model reset on the training split, and differs from one reset on
    # the evaluation split
    result = interpolate(a, b, evaluation, points=3, repair=True, reset_bn=train)
    assert result.normalization == "bn-reset"
    mixed = copy.deepcopy(a)
    mixed.load_state_dict({k: 0.5 * (v + b.state_dict()[k]) if v.is_floating_point() else v
                           for k, v in a.state_dict().items()})
    with torch.no_grad():
        on_train = float(F.cross_entropy(reset_bn(mixed, train)(evaluation[0]), evaluation[1]))
        on_eval = float(F.cross_entropy(reset_bn(mixed, evaluation)(evaluation[0]), evaluation[1]))
    assert result.losses[1] == pytest.approx(on_train, abs=1e-12)
    assert abs(on_train - on_eval) > 1e-6
    deliberate = interpolate(a, b, evaluation, points=3, repair=True, reset_bn=True)
    assert deliberate.losses[1] == pytest.approx(on_eval, abs=1e-12)


def test_repair_sets_each_hidden_layer_to_the_interpolated_endpoint_statistics(pair, data):
    a, b = pair
    x, _ = data
    objective = Objective(a, data)
    engine = PathEngine(objective, repair=True)
    params_a = {k: v.detach() for k, v in a.named_parameters()}
    params_b = {k: v.detach() for k, v in b.named_parameters()}
    ends = (engine.endpoint_stats(params_a, {}), engine.endpoint_stats(params_b, {}))

    def hand_stats(model):
        with torch.no_grad():
            z1 = model[1](x)
            z2 = model[3](model[2](z1))
        return [(z.mean(0), z.std(0, unbiased=False)) for z in (z1, z2)]

    stats_a, stats_b = hand_stats(a), hand_stats(b)
    middle = {k: 0.5 * (params_a[k] + params_b[k]) for k in params_a}
    engine.repair.fit(middle, {}, ends, 0.5)
    seen = {}
    handles = [a[i].register_forward_hook(lambda m, i, o, i_=i: seen.__setitem__(i_, o))
               for i in (1, 3)]
    try:
        with engine.repair.hooks(), torch.no_grad():
            objective.forward(middle, x, {})
    finally:
        for handle in handles:
            handle.remove()
    # hooks run in registration order: ours see the output before REPAIR; apply it by hand
    for layer, index in enumerate((1, 3)):
        scale, shift = engine.repair.corrections[str(index)]
        corrected = seen[index] * scale + shift
        target_mean = 0.5 * (stats_a[layer][0] + stats_b[layer][0])
        target_std = 0.5 * (stats_a[layer][1] + stats_b[layer][1])
        torch.testing.assert_close(corrected.mean(0), target_mean, atol=1e-10, rtol=0)
        torch.testing.assert_close(corrected.std(0, unbiased=False), target_std, atol=1e-10, rtol=0)
    same = interpolate(a, copy.deepcopy(a), data, points=3, repair=True)
    assert same.normalization == "repair" and same.barrier == pytest.approx(0, abs=1e-12)


def test_frozen_parameters_move_along_the_path_too(pair, data):
    a, b = pair
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    for model in (a, b):
        model[1].requires_grad_(False)
    result = interpolate(a, b, data, points=3)
    assert result.losses[1] == pytest.approx(_by_hand(a, b, 0.5, *data)[0], abs=1e-12)


def test_an_objective_can_stand_for_model_a(pair, data):
    a, b = pair
    from_objective = interpolate(Objective(a, data, batch_size=10), b, points=5)
    assert from_objective.losses == pytest.approx(interpolate(a, b, data, points=5).losses, abs=1e-12)
