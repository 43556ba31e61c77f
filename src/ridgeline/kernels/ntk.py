"""The empirical neural tangent kernel Θ(x, x') = J(x) J(x')ᵀ of any PyTorch model.

Computed tile by tile over (N1, N2) so that the peak memory, estimated before any work,
stays under a budget; two implementations (Jacobian contraction and NTK-vector products)
are chosen between by a cost model (METHODS.md §4).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ridgeline import distributed
from ridgeline.errors import ConfigError, DataError, ShapeMismatchError
from ridgeline.kernels._jacobians import (
    Features,
    JacobianEngine,
    VectorProductEngine,
    check_model,
    probe_model,
)
from ridgeline.kernels._plan import NTKPlan, default_budget, make_plan, parse_bytes
from ridgeline.outputs import ATTENTION_NOTE, differentiable_attention
from ridgeline.progress import progress_bar

__all__ = ["empirical_ntk", "plan_ntk", "NTKPlan"]

TRACES = ("sum", "mean", None)
METHODS = ("auto", "jacobian", "ntk_vp")


def _check_inputs(x1: torch.Tensor, x2: torch.Tensor | None, params: dict[str, torch.Tensor]
                  ) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{name} must be a tensor of inputs (N, ...), got {type(x).__name__}.")
        if x.dim() < 1 or x.shape[0] < 1:
            raise ShapeMismatchError(f"{name} has shape {tuple(x.shape)}; it needs a leading "
                                     "example axis with at least one example: (N, *input_shape).")
    if x2 is not None:
        if x2.device != x1.device:
            raise DataError(f"x1 is on {x1.device} but x2 is on {x2.device}; move both to the "
                            "model's device (x2.to(x1.device)).")
        if x2.dtype != x1.dtype:
            raise DataError(f"x1 has dtype {x1.dtype} but x2 has {x2.dtype}; convert one "
                            f"(x2.to({x1.dtype})).")
        if x2.shape[1:] != x1.shape[1:]:
            raise ShapeMismatchError(f"x1 holds examples of shape {tuple(x1.shape[1:])} but x2 of "
                                     f"shape {tuple(x2.shape[1:])}; both must match the model's "
                                     "input shape.")
    first = next(iter(params.values()))
    if x1.device != first.device:
        raise DataError(f"the inputs are on {x1.device} but the model's parameters on "
                        f"{first.device}; move them with x.to({str(first.device)!r}).")
    if x1.is_floating_point() and x1.dtype != first.dtype:
        raise DataError(f"the inputs have dtype {x1.dtype} but the model's parameters "
                        f"{first.dtype}; convert the inputs (x.to({first.dtype})) or the model.")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise DataError(f"{name} contains NaN or inf; clean the inputs first.")


def _prepare(model, x1, x2, trace, method, chunk_size, memory_budget):
    if trace not in TRACES:
        raise ConfigError(f"trace must be 'sum', 'mean' or None, got {trace!r}.")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size
                                   or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    params = check_model(model)
    _check_inputs(x1, x2, params)
    facts = probe_model(model, params, x1[0])
    budget = (parse_bytes(memory_budget) if memory_budget is not None
              else default_budget(x1.device))
    n1 = int(x1.shape[0])
    n2 = n1 if x2 is None else int(x2.shape[0])
    plan = make_plan(facts, n1, n2, symmetric=x2 is None, full=trace is None, method=method,
                     chunk_size=None if chunk_size is None else int(chunk_size),
                     memory_budget=budget)
    if facts.attention:
        plan = dataclasses.replace(plan, notes=(*plan.notes, ATTENTION_NOTE))
    return params, facts, plan


def plan_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
             trace: str | None = "sum", method: str = "auto", chunk_size: int | None = None,
             memory_budget: int | str | None = None) -> NTKPlan:
    """How :func:`empirical_ntk` would compute this kernel: method, tile size, memory.

    Runs the model on one example only (to count outputs, flops and activation memory);
    raises :class:`~ridgeline.errors.MemoryBudgetError` exactly when ``empirical_ntk``
    would. Arguments as in :func:`empirical_ntk`.
    """
    return _prepare(model, x1, x2, trace, method, chunk_size, memory_budget)[2]


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
                  trace: str | None = "sum", method: str = "auto",
                  chunk_size: int | None = None, memory_budget: int | str | None = None,
                  progress: bool = False) -> torch.Tensor:
    """The empirical neural tangent kernel of a model between two sets of inputs.

    Θ(x, x')_{oq} = Σ_p ∂f_o(x)/∂θ_p · ∂f_q(x')/∂θ_p = [J(x) J(x')ᵀ]_{oq}

    over every trainable parameter θ (linear, conv, norm layers alike), with f(x) ∈ R^O
    the model's output for one example (flattened). The model is evaluated in its current
    mode, which must not couple examples: BatchNorm in train mode is refused (call
    ``model.eval()`` to use its running statistics). The output is reduced to its logits
    by :func:`ridgeline.outputs.as_logits` (Hugging Face models as they come; a language
    model's O is T·V). Both methods run ``scaled_dot_product_attention`` on its MATH
    backend (per-example ``vmap`` and forward mode need it); :func:`plan_ntk`'s notes say
    so.

    The kernel is computed over (N1, N2) tiles of ``chunk_size`` examples. Its peak memory
    is estimated before any work from one probe example; if no tile size keeps it under
    ``memory_budget`` a :class:`~ridgeline.errors.MemoryBudgetError` names one that does.
    When ``x2`` is omitted only the tiles on and above the diagonal are computed and the
    result is exactly symmetric (and positive semi-definite up to rounding).

    Parameters
    ----------
    model : nn.Module
        Any module mapping a batch (N, ...) to outputs (N, ...) one example at a time.
    x1 : Tensor (N1, ...)
    x2 : Tensor (N2, ...), optional
        Defaults to ``x1`` (the Gram matrix of x1).
    trace : {"sum", "mean", None}
        ``"sum"`` (default) returns Σ_o Θ_oo, as the torch.func tutorial does;
        ``"mean"`` returns (1/O) Σ_o Θ_oo, the convention of neural-tangents (its
        ``trace_axes`` *average* over outputs) and the per-output kernel that the
        infinite-width limit (:func:`infinite_ntk`) describes; ``None`` keeps the
        output blocks, shape (N1, N2, O, O).
    method : {"auto", "jacobian", "ntk_vp"}
        ``"jacobian"``: per-example Jacobians by ``vmap(jacrev)``, contracted layer by
        layer — cost ≈ N·O·F + N1·N2·O·P (traced; O²·P for the full kernel), where linear
        layers keep their Jacobian factored as δ ⊗ a so their P is replaced by
        O·out + in. ``"ntk_vp"``: vjps J(x')ᵀe_q then ``jvp`` of the batched forward,
        cost ≈ N1·N2·O·3F with the memory of a few forward passes. ``"auto"`` takes the
        cheaper of the two that fits the budget (F: forward flops per example).
    chunk_size : int, optional
        Examples per tile side; chosen as large as the budget allows (≤ 1024) if omitted.
    memory_budget : int or str, optional
        Bytes (or e.g. ``"4GiB"``) for the whole computation, output included. Defaults
        to 90% of free CUDA memory, or half of the host's available memory on CPU.
    progress : bool
        Show a progress bar over tiles.

    Returns
    -------
    Tensor
        (N1, N2) for a traced kernel, (N1, N2, O, O) for ``trace=None``; on x1's device,
        in the model's dtype.

    References
    ----------
    Jacot, Gabriel & Hongler (2018), "Neural Tangent Kernel: Convergence and Generalization
    in Neural Networks"; Novak et al. (2022), "Fast Finite Width Neural Tangent Kernel";
    PyTorch tutorial "Neural Tangent Kernels" (torch.func).
    """
    params, facts, plan = _prepare(model, x1, x2, trace, method, chunk_size, memory_budget)
    symmetric = x2 is None
    x2 = x1 if x2 is None else x2
    o, c = facts.num_outputs, plan.chunk_size
    full = trace is None
    shape = (plan.n1, plan.n2, o, o) if full else (plan.n1, plan.n2)
    spread = distributed.is_distributed()
    allocate = torch.zeros if spread else torch.empty
    kernel = allocate(shape, dtype=next(iter(params.values())).dtype, device=x1.device)
    rows = range(0, plan.n1, c)
    pairs = [(i, j) for i in rows for j in range(i if symmetric else 0, plan.n2, c)]
    if spread:  # under torch.distributed each rank computes every world_size-th tile
        pairs = distributed.shard_indices(pairs)
    with torch.no_grad(), progress_bar(len(pairs), "empirical NTK", progress) as bar, \
            differentiable_attention(facts.attention):
        if plan.method == "jacobian":
            _run_jacobian(JacobianEngine(model, params, facts), kernel, x1, x2, plan, pairs,
                          symmetric, full, bar)
        else:
            _run_vector_products(VectorProductEngine(model, params, facts), kernel, x1, x2,
                                 plan, pairs, symmetric, full, bar)
    if spread:
        kernel = distributed.all_reduce_sum(kernel)
    if trace == "mean":
        kernel /= o
    return kernel


def _write(kernel: torch.Tensor, tile: torch.Tensor, i: int, j: int, symmetric: bool,
           full: bool) -> None:
    """Store a tile at (i, j) and, for a symmetric kernel, its mirror at (j, i)."""
    na, nb = tile.shape[0], tile.shape[1]
    transpose = (lambda t: t.permute(1, 0, 3, 2)) if full else (lambda t: t.T)
    if symmetric and i == j:
        tile = (tile + transpose(tile)).mul_(0.5)
    kernel[i:i + na, j:j + nb] = tile
    if symmetric and i != j:
        kernel[j:j + nb, i:i + na] = transpose(tile)


def _features(engine: JacobianEngine, x: torch.Tensor, c: int) -> Features:
    """Jacobians of every example of x, computed c at a time into one store."""
    n = int(x.shape[0])
    if n <= c:
        return engine.features(x)
    store = None
    for start in range(0, n, c):
        block = engine.features(x[start:start + c])
        if store is None:
            store = Features.empty(n, engine.facts, dtype=block.dtype, device=x.device)
        store.fill(start, block)
    return store


def _run_jacobian(engine, kernel, x1, x2, plan, pairs, symmetric, full, bar) -> None:
    c = plan.chunk_size
    if plan.resident:
        rows = _features(engine, x1, plan.jacobian_chunk)
        cols = rows if symmetric else _features(engine, x2, plan.jacobian_chunk)
        for i, j in pairs:
            tile = engine.contract(rows.rows(i, i + c), cols.rows(j, j + c), full=full)
            _write(kernel, tile, i, j, symmetric, full)
            bar.advance()
        return
    current, rows = -1, None
    for i, j in pairs:
        if i != current:
            current, rows = i, engine.features(x1[i:i + c])
        cols = rows if symmetric and i == j else engine.features(x2[j:j + c])
        _write(kernel, engine.contract(rows, cols, full=full), i, j, symmetric, full)
        bar.advance()


def _run_vector_products(engine, kernel, x1, x2, plan, pairs, symmetric, full, bar) -> None:
    c = plan.chunk_size
    by_column: dict[int, list[int]] = {}
    for i, j in pairs:
        by_column.setdefault(j, []).append(i)
    for j, row_starts in by_column.items():
        vjps = engine.vjps(x2[j:j + c])
        for i in row_starts:
            tile = engine.tile(x1[i:i + c], vjps, tangent_chunk=plan.tangent_chunk)
            if not full:
                tile = tile.diagonal(dim1=2, dim2=3).sum(-1)
            _write(kernel, tile, i, j, symmetric, full)
            bar.advance()

