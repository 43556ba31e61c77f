"""Run under ``torchrun --nproc_per_node=2``: every rank computes the same quantities with a
sharded Objective; rank 0 writes them to the JSON file named on the command line.

Each check is a function ``name(objective) -> tensor or list``; the test computes the same
in one process and compares.
"""

from __future__ import annotations

import atexit
import json
import sys
import time

import torch
import torch.distributed as dist

from ridgeline import Objective, distributed
from ridgeline.params import flatten, random_direction


def problem(dtype: torch.dtype):
    """The shared problem: a small MLP and 37 examples (uneven batches of 8)."""
    from ridgeline.data import gaussian_mixture
    from ridgeline.models import mlp

    torch.manual_seed(0)
    model = mlp(4, [6], 3, activation="tanh").to(dtype)
    data = gaussian_mixture(37, num_classes=3, dim=4, seed=1).to(dtype=dtype)
    return model, data


def quantities(objective: Objective) -> dict:
    """Everything compared between one and two processes."""
    out: dict = {}
    loss, grad = objective.loss_and_grad()
    out["loss"] = [float(loss)]
    out["grad"] = flatten(grad).tolist()
    direction = random_direction(objective.params(), normalization=None, ignore=None, seed=3)
    out["hvp"] = flatten(objective.hvp(direction)).tolist()
    out["accuracy"] = [objective.loss_and_accuracy()[1]]
    for name, extra in EXTRA_CHECKS.items():
        out[name] = extra(objective)
    return out


EXTRA_CHECKS: dict = {}


def _register_instrument_checks() -> None:
    """Instrument checks, added when the instruments are present."""
    try:
        from ridgeline import curvature
    except ImportError:  # pragma: no cover
        curvature = None
    if curvature is not None and hasattr(curvature, "top_eigenvalues"):
        EXTRA_CHECKS["top_eigenvalues"] = lambda o: curvature.top_eigenvalues(
            o, k=2, tol=1e-8, seed=0).values.tolist()
    from ridgeline import connectivity

    def path_losses(objective):
        torch.manual_seed(1)
        from ridgeline.models import mlp

        other = mlp(4, [6], 3, activation="tanh").to(objective.dtype)
        result = connectivity.interpolate(objective, other, points=5)
        return [float(v) for v in result.losses]

    EXTRA_CHECKS["path_losses"] = path_losses

    from ridgeline import kernels

    def ntk_block(objective):
        inputs = next(objective.per_batch(shard=False)).inputs
        return kernels.empirical_ntk(objective.model, inputs[:7], chunk_size=3).flatten().tolist()

    EXTRA_CHECKS["ntk_block"] = ntk_block
    EXTRA_CHECKS["bn_train_one_batch"] = bn_train_one_batch
    EXTRA_CHECKS["forward_gradient_step_bn"] = forward_gradient_step_bn
    if curvature is not None and hasattr(curvature, "trace"):
        EXTRA_CHECKS["trace"] = lambda o: [float(curvature.trace(
            o, method="hutchinson", max_matvecs=20, rtol=1e-12, seed=0).value)]


def _bn_model(dtype: torch.dtype):
    from ridgeline.models import mlp

    torch.manual_seed(2)
    return mlp(4, [6], 3, activation="tanh", norm="batch").to(dtype)


def bn_train_one_batch(objective: Objective) -> list:
    """A BatchNorm model in train mode on ONE batch (fewer batches than ranks): the rank
    without a batch must still take part in every all-reduce."""
    from ridgeline.gradients import forward_gradient

    _, data = problem(objective.dtype)
    bn = Objective(_bn_model(objective.dtype), data, train_mode=True)  # one batch of 37
    loss, grad = bn.loss_and_grad()
    direction = random_direction(bn.params(), normalization=None, ignore=None, seed=4)
    estimate = forward_gradient(bn, num_guesses=3, seed=5)
    return ([float(loss)] + flatten(grad).tolist() + flatten(bn.hvp(direction)).tolist()
            + list(bn.loss_and_accuracy()) + [estimate.loss]
            + flatten(estimate.estimate).tolist())


def forward_gradient_step_bn(objective: Objective) -> list:
    """One ForwardGradientSGD step of a BatchNorm model in train mode (its Objective holds
    one batch, so under torchrun every rank but one has none)."""
    from ridgeline.gradients import ForwardGradientSGD

    _, data = problem(objective.dtype)
    model = _bn_model(objective.dtype).train()
    rule = ForwardGradientSGD(model, lr=0.1, momentum=0.0, seed=6)
    inputs, targets = data.as_tuple()
    loss, _ = rule.step(inputs[:16], targets[:16])
    return [float(loss)] + [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]


def mismatched(path: str) -> None:
    """Rank 1 holds fewer examples: the Objective must refuse before any work."""
    from ridgeline.errors import DistributedError

    model, data = problem(torch.float64)
    if distributed.rank() == 1:
        data = data.subset(30)
    try:
        Objective(model, data, batch_size=8)
        message = "no error"
    except DistributedError as exc:
        message = str(exc)
    if distributed.is_main_process():
        with open(path, "w") as handle:
            json.dump({"error": message}, handle)


def exit_without_teardown(path: str) -> None:
    """The life cycle of ``ridgeline study`` under torchrun: the group comes from
    init_from_environment, the ranks all-reduce, and they return with no explicit
    teardown, rank 0 last (it lingers, as it does writing a report). Each rank records at
    exit, after ridgeline's exit hook has run, whether its group was still alive."""
    work = torch.ones(1000)
    for _ in range(20):
        work = distributed.all_reduce_sum(work) / distributed.world_size()
    _AT_EXIT.update(rank=distributed.rank(), world_size=distributed.world_size(),
                    value=float(work[0]))
    if distributed.is_main_process():
        time.sleep(1.0)


_AT_EXIT: dict = {}


def _record_at_exit(path: str) -> None:
    """Registered before init_from_environment, so atexit runs it after ridgeline's hook."""
    _AT_EXIT["group_alive_at_exit"] = dist.is_initialized()
    with open(f"{path}.rank{_AT_EXIT.get('rank', 'unknown')}", "w") as handle:
        json.dump(_AT_EXIT, handle)


def main(path: str, mode: str) -> None:
    if mode == "exit":
        atexit.register(_record_at_exit, path)
    distributed.init_from_environment("gloo")  # also registers the teardown at exit
    assert dist.is_initialized()
    if mode == "exit":
        exit_without_teardown(path)
        return
    try:
        if mode == "mismatch":
            mismatched(path)
            return
        _register_instrument_checks()
        dtype = getattr(torch, mode)
        model, data = problem(dtype)
        objective = Objective(model, data, batch_size=8)
        values = quantities(objective)
        values["world_size"] = [distributed.world_size()]
        if distributed.is_main_process():
            with open(path, "w") as handle:
                json.dump(values, handle)
    finally:
        distributed.shutdown()
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
