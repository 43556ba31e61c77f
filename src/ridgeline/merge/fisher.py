"""Diagonal Fisher information of a classifier, per parameter, by vmapped per-example
gradients (Matena & Raffel 2022, "Merging models with Fisher-weighted averaging")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad, vjp, vmap

from ridgeline.errors import ConfigError, DataError, MemoryBudgetError
from ridgeline.objective import Objective, as_objective, module_mode
from ridgeline.params import Params, named_buffers, named_parameters

__all__ = ["fisher_diagonal", "FISHER_KINDS"]

FISHER_KINDS = ("exact", "empirical")

#: bytes the per-example gradients of one chunk may take when chunk_size is not given
DEFAULT_MEMORY_BUDGET = 16 * 2 ** 20


def _chunk_size(per_row_bytes: int, rows_per_example: int, chunk_size: int | None,
                memory_budget: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be positive, got {chunk_size}.")
        return int(chunk_size)
    per_example = per_row_bytes * rows_per_example
    fits = memory_budget // max(per_example, 1)
    if fits < 1:
        raise MemoryBudgetError(
            f"one example's gradients take {per_example / 2 ** 20:.1f} MiB "
            f"({rows_per_example} per example) but memory_budget is "
            f"{memory_budget / 2 ** 20:.1f} MiB; raise memory_budget to at least "
            f"{per_example} bytes or pass chunk_size=1.")
    return int(fits)


def fisher_diagonal(model: nn.Module | Objective, data: Any = None, *, kind: str = "exact",
                    chunk_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                    batch_size: int | None = None) -> Params:
    """The diagonal of the Fisher information of a classifier, by parameter name.

    ``kind="exact"`` (the model's own predictive distribution, no labels needed):

        F = (1/N) Σ_x Σ_c p_c(x) (∂ log p_c(x) / ∂θ)²,      p(x) = softmax(f(x; θ)),

    ``kind="empirical"`` (the true labels y):

        F̃ = (1/N) Σ_x (∂ log p_y(x) / ∂θ)²  (for a custom or MSE loss: (∂ℓ(f(x), y)/∂θ)²).

    Per-example gradients come from ``torch.func.vmap`` over ``grad`` (the exact kind vmaps
    over the classes as well), ``chunk_size`` examples at a time; each batch mean is
    weighted by its size, so F is the exact dataset mean. Every parameter is included,
    frozen ones too (a merge moves all of them). The model is evaluated in eval mode.

    Parameters
    ----------
    model : nn.Module or Objective
    data : (inputs, targets), Dataset or DataLoader; omit when passing an Objective.
    kind : {"exact", "empirical"}
    chunk_size : int, optional
        Examples per vmapped chunk; by default as many as fit ``memory_budget`` bytes
        (each example holds C gradients for the exact kind, 1 for the empirical one;
        small chunks are faster on CPUs, whose caches they fit).
    memory_budget : int
        Bytes the per-example gradients of one chunk may take (default 16 MiB).

    Returns
    -------
    dict[str, Tensor]
        F by parameter name, shaped like each parameter (non-negative).

    References
    ----------
    Amari (1998), "Natural gradient works efficiently in learning"; Kunstner, Balles &
    Hennig (2019), "Limitations of the empirical Fisher approximation"; Matena & Raffel
    (2022), "Merging models with Fisher-weighted averaging", NeurIPS.
    """
    if kind not in FISHER_KINDS:
        raise ConfigError(f"kind must be 'exact' or 'empirical', got {kind!r}.")
    if data is None and not isinstance(model, Objective):
        raise DataError("the Fisher information needs data: pass data=(inputs, targets), a "
                        "Dataset or a DataLoader.")
    objective = as_objective(model, data, batch_size=batch_size)
    if kind == "exact" and objective.loss_name != "cross_entropy":
        raise ConfigError(f"the exact Fisher is defined here for classifiers (softmax "
                          f"outputs, loss 'cross_entropy'); the objective's loss is "
                          f"{objective.loss_name!r}. Use kind='empirical'.")
    net = objective.model
    params = named_parameters(net, trainable_only=False)
    buffers = named_buffers(net)
    probe = next(objective.per_batch(shard=False))
    with torch.no_grad():
        classes = int(objective.forward(params, probe.inputs[:1], buffers).reshape(1, -1).shape[1])
    element = next(iter(params.values())).element_size() if params else 4
    row_bytes = sum(p.numel() for p in params.values()) * element
    rows = classes if kind == "exact" else 1
    chunk = _chunk_size(row_bytes, rows, chunk_size, memory_budget)
    loss_fn = objective.loss_fn

    def log_probs(p: Params, x: torch.Tensor) -> torch.Tensor:
        out = objective.forward(p, x.unsqueeze(0), buffers)
        return torch.log_softmax(out.reshape(-1), dim=0)

    def squared_exact(x: torch.Tensor) -> Params:
        # one forward, then one pullback per class: ∂ log p_c/∂θ for every c
        logp, pullback = vjp(lambda p: log_probs(p, x), params)
        probs = logp.detach().exp()
        (per_class,) = vmap(pullback)(torch.eye(probs.numel(), dtype=probs.dtype,
                                                device=probs.device))
        shape = (-1,) + (1,) * 8
        return {k: (probs.view(shape[:g.dim()]) * g.pow(2)).sum(0)
                for k, g in per_class.items()}

    def squared_empirical(x: torch.Tensor, y: torch.Tensor) -> Params:
        def example_loss(p: Params) -> torch.Tensor:
            return loss_fn(objective.forward(p, x.unsqueeze(0), buffers), y.unsqueeze(0))

        return {k: g.pow(2) for k, g in grad(example_loss)(params).items()}

    def batch(x: torch.Tensor, y: torch.Tensor) -> Params:
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        for start in range(0, x.shape[0], chunk):
            xs, ys = x[start:start + chunk], y[start:start + chunk]
            if kind == "exact":
                squares = vmap(squared_exact)(xs)
            else:
                squares = vmap(squared_empirical)(xs, ys)
            for k in total:
                total[k] += squares[k].sum(0)
        return {k: v / x.shape[0] for k, v in total.items()}

    with module_mode(net, False):
        return objective.batch_mean(batch)
