"""Curvature matrices of a training objective as matrix-free linear operators.

:func:`hessian`, :func:`ggn` and :func:`fisher` return a :class:`CurvatureOperator` acting
on flat vectors over (a subset of) the parameters: the dataset-level matrix
Σ_b (n_b/N) M_b, each batch's product computed with ``torch.func`` and summed by
:meth:`ridgeline.Objective.batch_mean` (size-weighted, all-reduced under
torch.distributed).
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from ridgeline.curvature.feedforward import feedforward_curvature
from ridgeline.errors import (
    ConfigError,
    MemoryBudgetError,
    ShapeMismatchError,
    UnsupportedOperationError,
)
from ridgeline.objective import Objective, as_objective
from ridgeline.params import Params, flatten

__all__ = ["CurvatureOperator", "hessian", "ggn", "fisher", "as_operator", "ParamFilter",
           "parse_memory"]

ParamFilter = str | Iterable[str] | Callable[[str, torch.Tensor], bool] | None
Product = Callable[[torch.Tensor, torch.Tensor, Params], Params]

KINDS = ("hessian", "ggn", "fisher")
DEFAULT_MEMORY_BUDGET = 2 ** 30


# ----------------------------------------------------------------------------- helpers
def parse_memory(budget: int | float | str | None) -> int:
    """Bytes from an int/float or a string such as ``"512MB"`` or ``"2GiB"``."""
    if budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(budget, (int, float)):
        if budget <= 0:
            raise ConfigError(f"memory_budget must be positive, got {budget}.")
        return int(budget)
    text = str(budget).strip().upper().replace(" ", "")
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40, "KB": 10 ** 3,
             "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return parse_memory(float(text[:-len(unit)]) * factor)
            except ValueError:
                break
    raise ConfigError(f"cannot read memory_budget={budget!r}; use bytes (int) or a string like "
                      "'512MB' or '2GiB'.")


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def select_parameters(params: Mapping[str, torch.Tensor], param_filter: ParamFilter) -> list[str]:
    """Names of the parameters kept by ``param_filter``.

    ``None`` keeps all; a string keeps names equal to it, starting with it followed by a dot
    (a module prefix such as ``"3"`` or ``"layers.2"``), or matching it as a glob pattern;
    a list of strings keeps the union; a callable ``f(name, tensor) -> bool`` decides.
    """
    names = list(params)
    if param_filter is None:
        return names
    if callable(param_filter):
        arity = len(inspect.signature(param_filter).parameters)
        keep = [n for n in names if (param_filter(n, params[n]) if arity >= 2 else param_filter(n))]
    else:
        patterns = [param_filter] if isinstance(param_filter, str) else list(param_filter)
        if not all(isinstance(p, str) for p in patterns):
            raise ConfigError("param_filter must be a name, a list of names/patterns, or a "
                              "callable (name, tensor) -> bool.")
        keep = [n for n in names if any(n == p or n.startswith(p + ".") or fnmatch.fnmatchcase(n, p)
                                        for p in patterns)]
    if not keep:
        raise ConfigError(f"param_filter={param_filter!r} selects no parameter; the model's "
                          f"parameters are {names}.")
    return keep


def _has(model: nn.Module, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(m, kinds) for m in model.modules())


def _mode_notes(objective: Objective) -> tuple[str, ...]:
    """What the evaluation mode means for this model; refuses dropout in train mode."""
    model = objective.model
    batchnorm = _has(model, (nn.modules.batchnorm._BatchNorm,))
    dropout = _has(model, (nn.modules.dropout._DropoutNd,))
    if objective.train_mode:
        if dropout:
            raise UnsupportedOperationError(
                "the Objective evaluates the model in train mode and the model has Dropout, so "
                "every product would use a different random mask and the operator would not be "
                "a matrix. Build the Objective with train_mode=False (the default).")
        if batchnorm:
            return ("BatchNorm evaluated in train mode (batch statistics): the curvature depends "
                    "on how the data is split into batches.",)
        return ()
    if batchnorm or dropout:
        layers = " and ".join(name for name, present in (("BatchNorm", batchnorm),
                                                         ("Dropout", dropout)) if present)
        return (f"model has {layers}: evaluated in eval mode (running statistics, no dropout).",)
    return ()


# ----------------------------------------------------------------------------- products
def _hessian_product(objective: Objective, fixed: Params) -> Product:
    """Forward-over-reverse H_b v = ∂/∂ε ∇L_b(θ + εv) (Pearlmutter 1994)."""

    def loss(p, x, y):
        return objective.batch_loss({**fixed, **p}, x, y)

    gradient = grad(loss)

    def product(x, y, params, tangent):
        return jvp(lambda p: gradient(p, x, y), (params,), (tangent,))[1]

    return product


def _relu_masks(loss: torch.Tensor) -> list:
    """Make the recorded gradient graph of every ReLU a product with a constant mask.

    Autograd records the ReLU's backward as ``threshold_backward(g, relu(z), 0)``, whose
    derivative with respect to its second argument is zero (the mask is piecewise
    constant) but is still computed: each Hessian product then fills and adds a zero
    tensor of the layer's activation size per ReLU. A hook on each ``ReluBackward0`` node
    of ``loss``'s graph returns g · 1[relu(z) > 0] instead — the same numbers, with the
    mask held constant, so the recorded graph has no edge to relu(z) (ReLU'' = 0 almost
    everywhere, so H is unchanged; ≈ 4 % less time per product on the 40-256-256-10 MLP
    of docs/curvature.md). Costs one mask of the activation's size per ReLU, kept with
    the recorded graph. Returns the hook handles (remove them once the gradient is
    recorded)."""
    handles, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
        if type(node).__name__ != "ReluBackward0":
            continue
        try:
            result = node._saved_result.detach()
            mask = (result > 0).to(result.dtype)
        except (RuntimeError, AttributeError):  # not readable (freed, custom hooks, renamed)
            continue

        def masked(grad_inputs, grad_outputs, mask=mask):
            if grad_outputs[0] is None:
                return None
            return (grad_outputs[0] * mask,)

        handles.append(node.register_hook(masked))
    return handles


class _RecordedGradient:
    """∇L_b recorded once with ``create_graph``; each product H v is one reverse pass through
    that graph (H is symmetric, so the vector-Jacobian product of ∇L is H v). Plain
    ``torch.autograd`` (no functorch wrapping of every op in the reverse pass); ReLU
    backward steps are recorded as products with a constant mask (:func:`_relu_masks`);
    a block of vectors goes through ``is_grads_batched`` on accelerators and one pass per
    vector on the CPU (faster there than any vmap)."""

    def __init__(self, objective: Objective, fixed: Params, params: Params, x, y) -> None:
        self.names = list(params)
        self.leaves = [params[n].detach().requires_grad_(True) for n in self.names]
        with torch.enable_grad():
            loss = objective.batch_loss({**fixed, **dict(zip(self.names, self.leaves))}, x, y)
            handles = _relu_masks(loss) if loss.grad_fn is not None else []
            try:
                grads = torch.autograd.grad(loss, self.leaves, create_graph=True,
                                            allow_unused=True)
            finally:
                for handle in handles:
                    handle.remove()
        # gradients that depend on θ, with the names of the parameters they belong to
        self.outputs = [(n, g) for n, g in zip(self.names, grads)
                        if g is not None and g.requires_grad]
        #: ∇L_b itself, a by-product of the recording (a Lanczos start vector, for free)
        self.gradient = {n: torch.zeros_like(p) if g is None else g.detach()
                         for n, p, g in zip(self.names, self.leaves, grads)}

    def _product(self, tangent: Params, batched: bool) -> Params:
        outs: tuple = (None,) * len(self.leaves)
        if self.outputs:
            outs = torch.autograd.grad([g for _, g in self.outputs], self.leaves,
                                       [tangent[n] for n, _ in self.outputs], retain_graph=True,
                                       allow_unused=True, is_grads_batched=batched)
        return {n: torch.zeros_like(tangent[n]) if o is None else o
                for n, o in zip(self.names, outs)}

    def __call__(self, tangent: Params) -> Params:
        return self._product(tangent, batched=False)

    def batched(self, tangent: Params) -> Params:
        if self.leaves[0].device.type == "cpu":  # a loop of single passes is faster on CPU
            count = next(iter(tangent.values())).shape[0]
            rows = [self._product({n: t[i] for n, t in tangent.items()}, batched=False)
                    for i in range(count)]
            return {n: torch.stack([r[n] for r in rows]) for n in self.names}
        return self._product(tangent, batched=True)


def _hessian_cached(objective: Objective, fixed: Params, params: Params, x, y):
    """R-operator sweeps for feed-forward chains (:mod:`.feedforward`), else a reverse pass
    through the recorded gradient graph."""
    chain = feedforward_curvature(objective, fixed, params, x, y)
    return chain if chain is not None else _RecordedGradient(objective, fixed, params, x, y)


def _ggn_product(objective: Objective, fixed: Params) -> Product:
    """G_b v = J_bᵀ (∇²_f L_b) J_b v: jvp through the network, the loss Hessian in output
    space, vjp back (Schraudolph 2002)."""

    def product(x, y, params, tangent):
        def f(p):
            return objective.forward({**fixed, **p}, x)

        out, jv = jvp(f, (params,), (tangent,))
        hjv = jvp(grad(lambda o: objective.loss_fn(o, y)), (out,), (jv,))[1]
        return vjp(f, params)[1](hjv)[0]

    return product


def _ggn_cached(objective: Objective, fixed: Params, params: Params, x, y):
    """R-operator sweeps for feed-forward chains (:mod:`.feedforward`), else the network's
    vjp recorded once and a jvp per product."""
    chain = feedforward_curvature(objective, fixed, params, x, y, gauss_newton=True)
    if chain is not None:
        return chain

    def f(p):
        return objective.forward({**fixed, **p}, x)

    out, pullback = vjp(f, params)
    out = out.detach()
    loss_grad = grad(lambda o: objective.loss_fn(o, y))

    def product(tangent):
        jv = jvp(f, (params,), (tangent,))[1]
        return pullback(jvp(loss_grad, (out,), (jv,))[1])[0]

    return product


def _per_example_losses(objective: Objective, fixed: Params, x, y):
    single = vmap(lambda o, t: objective.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))

    def losses(p):
        return single(objective.forward({**fixed, **p}, x), y)

    return losses


def _fisher_product(objective: Objective, fixed: Params) -> Product:
    """F_b v = (1/n_b) Σ_i g_i (g_iᵀ v) with g_i = ∇ℓ_i: the per-example directional
    derivatives g_iᵀ v come from one jvp of the vector of losses, the sum from one vjp."""

    def product(x, y, params, tangent):
        losses = _per_example_losses(objective, fixed, x, y)
        d = jvp(losses, (params,), (tangent,))[1]
        return vjp(losses, params)[1](d / d.shape[0])[0]

    return product


def _fisher_cached(objective: Objective, fixed: Params, params: Params, x, y):
    losses = _per_example_losses(objective, fixed, x, y)
    _, pullback = vjp(losses, params)

    def product(tangent):
        d = jvp(losses, (params,), (tangent,))[1]
        return pullback(d / d.shape[0])[0]

    return product


_PRODUCTS = {"hessian": (_hessian_product, _hessian_cached),
             "ggn": (_ggn_product, _ggn_cached),
             "fisher": (_fisher_product, _fisher_cached)}


# ----------------------------------------------------------------------------- operator
class CurvatureOperator:
    """A symmetric P×P curvature matrix of a training objective, as products with vectors.

    M = Σ_b (n_b/N) M_b over the batches of the objective's dataset, where M_b is, for
    ``kind``:

    * ``"hessian"`` — ∇²_θ L_b (forward-over-reverse products, Pearlmutter 1994);
    * ``"ggn"`` — J_bᵀ ∇²_f L_b J_b, the generalised Gauss–Newton matrix (PSD for convex
      losses such as cross-entropy and MSE; Schraudolph 2002; Martens 2020);
    * ``"fisher"`` — (1/n_b) Σ_i ∇ℓ_i ∇ℓ_iᵀ, the empirical Fisher (Kunstner et al. 2019).

    Vectors are flat, over the selected parameters in ``param_names`` order (see
    :meth:`unflatten`). The operator is the curvature at the parameters the model had when
    it was built (they are copied). When the whole dataset is one batch the forward (and
    backward) pass is recorded once and reused by every product (``cache=True``; a
    Hessian product is then one reverse pass through the recorded gradient graph, which
    gives the same numbers as forward-over-reverse).

    Attributes
    ----------
    kind : str
    shape : (P, P)
    param_names : tuple of str
    dtype, device
    mode : {"eval", "train"}
        How the model is evaluated (eval mode unless the Objective says otherwise).
    notes : tuple of str
        Facts a result should carry (e.g. BatchNorm evaluated in eval mode; attention
        products on the MATH backend of ``scaled_dot_product_attention``, see
        :mod:`ridgeline.outputs`).
    matvecs : int
        Products computed so far (a block of b vectors counts b).
    """

    def __init__(self, objective: Objective, kind: str = "hessian", *,
                 param_filter: ParamFilter = None, cache: bool | None = None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}.")
        self.objective, self.kind = objective, kind
        self.notes = _mode_notes(objective) + objective.attention_notes
        self.mode = "train" if objective.train_mode else "eval"
        every = objective.params()
        names = select_parameters(every, param_filter)
        self.param_names = tuple(names)
        self._params = {n: every[n].clone() for n in names}
        self._fixed = {n: t.clone() for n, t in every.items() if n not in self._params}
        size = sum(t.numel() for t in self._params.values())
        self.shape = (size, size)
        first = next(iter(self._params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.matvecs = 0
        self._product = _PRODUCTS[kind][0](objective, self._fixed)
        self._batched = vmap(self._product, in_dims=(None, None, None, 0))
        self._cache_requested = cache
        self._cached: tuple[int, Callable[[Params], Params]] | None = None
        self._cache_ready = False
        self._recorded: dict[int, Callable[[Params], Params]] | None = None

    # ------------------------------------------------------------------ vectors
    @property
    def params(self) -> Params:
        """The selected parameters θ (a copy, by name)."""
        return dict(self._params)

    @property
    def point(self) -> Params:
        """Every parameter of the model (selected or held fixed) where M is evaluated."""
        return {**self._fixed, **self._params}

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A flat vector from tensors named like :attr:`param_names` (others ignored)."""
        missing = [n for n in self.param_names if n not in tensors]
        if missing:
            raise ShapeMismatchError(f"tensors are missing parameters {missing[:5]} of the operator.")
        return flatten({n: tensors[n] for n in self.param_names})

    def unflatten(self, vector: torch.Tensor) -> Params:
        """Split a flat vector (or a batch of them, shape (b, P)) into tensors by name."""
        leading = tuple(vector.shape[:-1])
        if vector.shape[-1] != self.shape[0] or vector.dim() > 2:
            raise ShapeMismatchError(
                f"got a vector of shape {tuple(vector.shape)} but the {self.kind} acts on "
                f"{self.shape[0]} parameters ({', '.join(self.param_names[:4])}"
                f"{', …' if len(self.param_names) > 4 else ''}); pass shape ({self.shape[0]},).")
        out, offset = {}, 0
        for name, t in self._params.items():
            out[name] = vector[..., offset:offset + t.numel()].reshape(*leading, *t.shape)
            offset += t.numel()
        return out

    def _prepare(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v))
        return v.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ caching
    def _cache(self) -> tuple[int, Callable[[Params], Params]] | None:
        """The single batch's recorded product, when the dataset is one batch."""
        if self._cache_ready:
            return self._cached
        self._cache_ready = True
        if self._cache_requested is False:
            return None
        batches = []
        for batch in self.objective.per_batch():
            batches.append(batch)
            if len(batches) > 1:
                break
        if len(batches) == 1:
            x, y = batches[0].inputs, batches[0].targets
            build = _PRODUCTS[self.kind][1]
            self._cached = (batches[0].size, build(self.objective, self._fixed, self._params, x, y))
        return self._cached

    def _recordings(self) -> dict[int, Callable[[Params], Params]]:
        """Per-batch R-operator recordings (:mod:`.feedforward`) by batch index, when the
        data has several batches that every pass repeats (tensor data) and the model is a
        feed-forward chain (Hessian or GGN): this process's batches in order while their
        recordings fit in ``DEFAULT_MEMORY_BUDGET`` (the work buffers are shared). The
        other batches' products are computed afresh every time, as for other models."""
        if self._recorded is not None:
            return self._recorded
        self._recorded = {}
        if (self._cache_requested is False or self.kind == "fisher"
                or not self.objective.fixed_batches or self._cache() is not None):
            return self._recorded
        buffers: dict = {}
        used = 0
        for batch in self.objective.per_batch():
            if batch.weight == 0:
                continue
            chain = feedforward_curvature(self.objective, self._fixed, self._params,
                                          batch.inputs, batch.targets,
                                          gauss_newton=self.kind == "ggn", buffers=buffers)
            if chain is None:
                break
            used += chain.nbytes
            if used > DEFAULT_MEMORY_BUDGET:
                break
            self._recorded[batch.index] = chain
        return self._recorded

    def _recorded_product(self, x: torch.Tensor, index: int):
        """The recorded product of batch ``index`` (inputs ``x``), or None."""
        cached = self._cache()
        if cached is not None:
            return cached[1] if x.shape[0] == cached[0] else None
        return self._recordings().get(index)

    def gradient(self) -> torch.Tensor:
        """∇L(θ) over the operator's parameters as a flat vector of length P: read off the
        recorded products where there are any (no extra work), else one gradient
        evaluation per batch. Runs in the same attention context as the products, since
        it may record the graph they use."""
        fixed = self._fixed
        batch_grad = grad(lambda p, x, y: self.objective.batch_loss({**fixed, **p}, x, y))
        with self.objective.differentiable_attention():

            def fn(x, y, index):  # the same pytree on every process (one all-reduce)
                recorded = getattr(self._recorded_product(x, index), "gradient", None)
                if recorded is not None:
                    return {n: recorded[n] for n in self._params}
                return {k: t.detach() for k, t in batch_grad(self._params, x, y).items()}

            every = self.objective.batch_mean(fn, indexed=True)
        return flatten({n: every[n] for n in self.param_names})

    def _batch_fn(self, tangent: Params, batched: bool):
        def fn(x, y, index):
            product = self._recorded_product(x, index)
            if product is not None:
                if batched:
                    product = getattr(product, "batched", None) or vmap(product)
                out = product(tangent)
            else:
                out = (self._batched if batched else self._product)(x, y, self._params, tangent)
            return {k: t.detach() for k, t in out.items()}

        return fn

    # ------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """M v for a flat vector v of length P."""
        v = self._prepare(v)
        if v.dim() != 1:
            raise ShapeMismatchError(f"matvec takes a 1-D vector of length {self.shape[0]}, got "
                                     f"shape {tuple(v.shape)}; use matmat for several vectors.")
        with self.objective.differentiable_attention():
            out = self.objective.batch_mean(self._batch_fn(self.unflatten(v), batched=False),
                                             indexed=True)
        self.matvecs += 1
        return flatten({n: out[n] for n in self.param_names})

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """M V for V of shape (P, b) (columns are vectors), by ``vmap`` over the columns."""
        matrix = self._prepare(matrix)
        if matrix.dim() != 2 or matrix.shape[0] != self.shape[0]:
            raise ShapeMismatchError(f"matmat takes a matrix of shape ({self.shape[0]}, b), got "
                                     f"{tuple(matrix.shape)}.")
        b = matrix.shape[1]
        if b == 0:
            return matrix.clone()
        tangent = self.unflatten(matrix.T.contiguous())
        with self.objective.differentiable_attention():
            out = self.objective.batch_mean(self._batch_fn(tangent, batched=True), indexed=True)
        self.matvecs += b
        return torch.cat([out[n].reshape(b, -1) for n in self.param_names], dim=1).T

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 in and out) for ``eigsh`` etc."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            return self.matvec(torch.as_tensor(np.ascontiguousarray(x).reshape(-1))).double().cpu().numpy()

        def mm(x):
            return self.matmat(torch.as_tensor(np.ascontiguousarray(x))).double().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm,
                              dtype=np.float64)

    def dense(self, *, memory_budget: int | float | str | None = DEFAULT_MEMORY_BUDGET,
              chunk_size: int | None = None) -> torch.Tensor:
        """The explicit P×P matrix, built from products with identity columns.

        Raises :class:`~ridgeline.errors.MemoryBudgetError` (naming the size) when the matrix
        would exceed ``memory_budget`` (bytes, or a string like ``"4GB"``; default 1 GiB).
        The result is symmetrised, (M + Mᵀ)/2.
        """
        size = self.shape[0]
        itemsize = torch.finfo(self.dtype).bits // 8
        need, budget = size * size * itemsize, parse_memory(memory_budget)
        if need > budget:
            largest = max(self._params.items(), key=lambda kv: kv[1].numel())
            fits = int(math.sqrt(budget / itemsize))
            raise MemoryBudgetError(
                f"a dense {self.kind} over {size:,} parameters is a {size:,}×{size:,} matrix of "
                f"{_human(need)} ({self.dtype}), over memory_budget={_human(budget)} (at most "
                f"{fits:,} parameters fit). Select fewer parameters with param_filter (the "
                f"largest tensor '{largest[0]}' has {largest[1].numel():,} values), raise "
                "memory_budget, or use matrix-free methods (top_eigenvalues, trace, density).")
        chunk = min(size, chunk_size or 64)
        columns = []
        eye = torch.eye(size, dtype=self.dtype, device=self.device)
        for start in range(0, size, chunk):
            columns.append(self.matmat(eye[:, start:start + chunk]))
        matrix = torch.cat(columns, dim=1)
        return (matrix + matrix.T) / 2

    def __repr__(self) -> str:
        return (f"CurvatureOperator(kind={self.kind!r}, shape={self.shape}, "
                f"params={len(self.param_names)} tensors, mode={self.mode!r}, dtype={self.dtype})")


# ----------------------------------------------------------------------------- builders
def _build(kind: str, model_or_objective, data, loss, param_filter, cache, kwargs
           ) -> CurvatureOperator:
    objective = as_objective(model_or_objective, data, loss=loss, **kwargs)
    return CurvatureOperator(objective, kind, param_filter=param_filter, cache=cache)


def hessian(model_or_objective: nn.Module | Objective, data: Any = None, *,
            loss: str | Callable = "cross_entropy", param_filter: ParamFilter = None,
            cache: bool | None = None, **objective_options: Any) -> CurvatureOperator:
    """The loss Hessian H = ∇²_θ L(θ), L = (1/N) Σ_i ℓ(f(x_i; θ), y_i), as an operator.

    Products are forward-over-reverse, H v = ∂/∂ε ∇L(θ + εv)|_{ε=0} (``jvp`` of ``grad``),
    summed over batches with weights n_b/N (exact with an uneven last batch) and
    all-reduced under torch.distributed. With one batch the gradient graph is recorded
    once and reused (``cache=None`` decides automatically; ``False`` disables it).

    Parameters
    ----------
    model_or_objective : nn.Module or Objective
    data : (inputs, targets), Dataset or DataLoader; omit when passing an Objective.
    loss : {"cross_entropy", "mse"} or callable
    param_filter : str, list of str, or callable (name, tensor) -> bool, optional
        Restrict to some parameters (e.g. ``"2"`` for the module ``2`` of a Sequential,
        ``"*.weight"``); the others are held fixed.
    cache : bool, optional
    **objective_options
        ``batch_size``, ``train_mode`` … passed to :class:`~ridgeline.Objective`.

    Notes
    -----
    BatchNorm and Dropout are evaluated in eval mode (the default ``Objective``); the
    operator's ``notes`` say so, and every result built on it repeats them.

    References
    ----------
    Pearlmutter (1994), "Fast exact multiplication by the Hessian".
    """
    return _build("hessian", model_or_objective, data, loss, param_filter, cache,
                  objective_options)


def ggn(model_or_objective: nn.Module | Objective, data: Any = None, *,
        loss: str | Callable = "cross_entropy", param_filter: ParamFilter = None,
        cache: bool | None = None, **objective_options: Any) -> CurvatureOperator:
    """The generalised Gauss–Newton matrix G = (1/N) Σ_i J_iᵀ ∇²_f ℓ_i J_i as an operator.

    J_i = ∂f(x_i)/∂θ; products are G v = Jᵀ (H_out (J v)): a ``jvp`` through the network,
    the loss Hessian in output space, and a ``vjp`` back. G is positive semi-definite for
    losses convex in the outputs (cross-entropy, MSE), and equals the Hessian minus the
    term Σ_i Σ_o ∂ℓ_i/∂f_o ∇²f_o. Arguments as in :func:`hessian`.

    References
    ----------
    Schraudolph (2002), "Fast curvature matrix-vector products for second-order gradient
    descent"; Martens (2020), "New insights and perspectives on the natural gradient method".
    """
    return _build("ggn", model_or_objective, data, loss, param_filter, cache, objective_options)


def fisher(model_or_objective: nn.Module | Objective, data: Any = None, *,
           loss: str | Callable = "cross_entropy", param_filter: ParamFilter = None,
           cache: bool | None = None, **objective_options: Any) -> CurvatureOperator:
    """The empirical Fisher F = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ (per-example loss gradients) as an
    operator.

    F v = (1/N) Σ_i ∇ℓ_i (∇ℓ_iᵀ v): the per-example directional derivatives come from one
    ``jvp`` of the vector of per-example losses and the weighted sum from one ``vjp``, so
    per-example gradients are never stored. (For cross-entropy the *true* Fisher equals
    :func:`ggn`.) The loss is applied to single examples through ``vmap``. Arguments as
    in :func:`hessian`.

    References
    ----------
    Kunstner, Balles & Hennig (2019), "Limitations of the empirical Fisher approximation
    for natural gradient descent".
    """
    return _build("fisher", model_or_objective, data, loss, param_filter, cache,
                  objective_options)


def as_operator(model_or_operator: Any, data: Any = None, *, curvature: str = "hessian",
                loss: str | Callable = "cross_entropy", param_filter: ParamFilter = None,
                **objective_options: Any) -> CurvatureOperator:
    """Accept a ready :class:`CurvatureOperator`, or build one of kind ``curvature``."""
    if isinstance(model_or_operator, CurvatureOperator):
        if data is not None or param_filter is not None:
            raise ConfigError("pass data and param_filter when building the operator, not "
                              "together with a ready CurvatureOperator.")
        return model_or_operator
    if curvature not in KINDS:
        raise ConfigError(f"curvature must be one of {KINDS}, got {curvature!r}.")
    return _build(curvature, model_or_operator, data, loss, param_filter, None, objective_options)
