"""predict_merge against explicit Hessians, quadratic losses and the pair barrier formula."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from ridgeline.connectivity import predict_barrier
from ridgeline.errors import ConfigError
from ridgeline.merge import merge, predict_merge, predicted_merge_loss
from ridgeline.models import mlp
from ridgeline.objective import Objective


def _data(n=25, d=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _loss_of_flat(model, x, y):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = torch.Size(shape).numel()
            params[name] = vector[offset:offset + n].view(shape)
            offset += n
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return f


def test_centroid_prediction_matches_taylor_expansion_with_explicit_hessians():
    torch.manual_seed(0)
    models = [mlp(4, [5], 3, activation="tanh").double() for _ in range(3)]
    x, y = _data()
    weights = [0.2, 0.3, 0.5]
    result = merge(models, weights=weights)
    theta_m = _flat(result.model)
    expected = 0.0
    for w, model in zip(weights, models):
        f = _loss_of_flat(model, x, y)
        theta = _flat(model)
        delta = theta_m - theta
        g = torch.autograd.functional.jacobian(f, theta)
        h = torch.autograd.functional.hessian(f, theta)
        expected += w * (float(f(theta)) + float(g @ delta) + 0.5 * float(delta @ h @ delta))
    terms = predicted_merge_loss(Objective(models[0], (x, y)), models, result.model, weights)
    assert terms["predicted"] == pytest.approx(expected, rel=1e-10)
    assert terms["spread"] == pytest.approx(
        sum(w * float(((theta_m - _flat(m)) ** 2).sum()) for w, m in zip(weights, models)))


def test_prediction_is_exact_for_a_quadratic_loss():
    # a linear model with squared error: L is a quadratic in θ, its Taylor series ends at H
    torch.manual_seed(1)
    models = [torch.nn.Linear(4, 2).double() for _ in range(4)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    plan = predict_merge(models, (x, y), loss="mse",
                         candidates=[{"method": "average"},
                                     {"method": "average", "weights": [1.0, 2.0, 3.0, 4.0]},
                                     {"method": "task_arithmetic", "scale": 0.3}],
                         base=models[0], eval_data=(x, y))
    for c in plan.candidates:
        assert c.predicted == pytest.approx(c.measured, rel=1e-10), c.label
    assert plan.spearman == pytest.approx(1.0)


def test_two_models_at_the_midpoint_give_mean_loss_plus_barrier_prediction():
    torch.manual_seed(2)
    a, b = (mlp(4, [6], 3, activation="tanh").double() for _ in range(2))
    x, y = _data(40)
    pair = predict_barrier(a, b, (x, y), measure=False)
    terms = predicted_merge_loss(Objective(a, (x, y)), [a, b], merge([a, b]).model, [1, 1])
    mean = 0.5 * (pair.terms["loss_a"] + pair.terms["loss_b"])
    assert terms["predicted"] - mean == pytest.approx(pair.predicted, rel=1e-9)
    assert terms["gradient_term"] == pytest.approx(pair.terms["gradient_term"], rel=1e-9)
    assert terms["curvature_term"] == pytest.approx(pair.terms["curvature_term"], rel=1e-9)


def test_planner_ranks_candidates_and_scores_the_ranking():
    torch.manual_seed(3)
    x, y = _data(60, seed=3)
    models = [mlp(4, [8], 3, activation="tanh").double() for _ in range(3)]
    plan = predict_merge(models, (x, y), methods=["average", "fisher"],
                         align=[None, "weights"], eval_data=_data(30, seed=4))
    assert len(plan.candidates) == 4
    predicted = [c.predicted for c in plan.candidates]
    assert predicted == sorted(predicted)
    for c in plan.candidates:  # each measured value is the merged network's real loss
        net = merge(models, data=(x, y), **c.options).model
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        assert c.measured == pytest.approx(float(loss), rel=1e-10)
    best = min(plan.candidates, key=lambda c: c.measured)
    assert plan.best_measured == best.label
    assert plan.regret == pytest.approx(plan.candidates[0].measured - best.measured)
    assert plan.spearman is not None and -1 <= plan.spearman <= 1
    out = plan.to_dict()
    assert len(out["candidates"]) == 4 and out["ranking"] == plan.ranking
    plan.plot()


def test_planner_rejects_unknown_candidate_options():
    torch.manual_seed(4)
    models = [mlp(4, [5], 3).double() for _ in range(2)]
    with pytest.raises(ConfigError, match="unknown"):
        predict_merge(models, _data(), candidates=[{"method": "average", "sparsity": 0.1}])
