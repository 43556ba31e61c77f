"""Permutation alignment of two networks: weight matching and activation matching.

Both find, for every permutation of a :class:`PermutationSpec`, the reordering of model B's
hidden units that best matches model A's, and return a permuted copy of B that computes
exactly B's function (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin").
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ridgeline.errors import ConfigError, DataError, ShapeMismatchError
from ridgeline.params import check_same_structure

from .assignment import solve_assignment
from .permutation_spec import (
    ACTIVATIONS,
    PermutationSpec,
    Traced,
    apply_permutations,
    coerce_spec,
    permutation_spec,
    traced,
)

__all__ = ["align", "AlignmentResult", "weight_matching", "activation_matching",
           "permute_model", "model_state"]


@dataclass(frozen=True)
class AlignmentResult:
    """The outcome of :func:`align`.

    Attributes
    ----------
    model : nn.Module
        A permuted copy of model B; it computes exactly B's function.
    permutations : dict[str, Tensor]
        Permutation name → LongTensor ``perm`` with unit ``i`` of the aligned model equal to
        unit ``perm[i]`` of B.
    iterations : int
        Full passes over the permutations (weight matching) or 1 (activation matching).
    objective_trace : tuple[float, ...]
        Weight matching: Σ_k ⟨θ_A,k, π(θ_B)_k⟩ after each pass (non-decreasing).
        Activation matching: the summed correlation of matched units.
    converged : bool
        Weight matching stopped because a full pass improved nothing (or less than
        ``tol``) before ``max_iter`` passes.
    method : str
    spec : PermutationSpec
    seconds : float
    initial_objective : float or None
        Weight matching: Σ_k ⟨θ_A,k, θ_B,k⟩ before any permutation.
    notes : tuple[str, ...]
        The spec's notes, and what the matching could not do (e.g. unmatched permutations).
    unmatched : tuple[str, ...]
        Activation matching: permutations for which the forward pass showed no activation
        to correlate; they are left as the identity (and said so in ``notes``).
    """

    model: nn.Module
    permutations: dict[str, torch.Tensor]
    iterations: int
    objective_trace: tuple[float, ...]
    converged: bool
    method: str
    spec: PermutationSpec
    seconds: float = 0.0
    initial_objective: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    unmatched: tuple[str, ...] = ()
    function_error: float | None = None
    function_scale: float | None = None

    @property
    def function_relative_error(self) -> float | None:
        """max |f_B(x) − f_πB(x)| / max |f_B(x)| on the example batch."""
        if self.function_error is None or self.function_scale is None:
            return None
        return self.function_error / max(self.function_scale, 1e-300)

    @property
    def changed_units(self) -> int:
        """How many hidden units moved (over all permutations)."""
        return int(sum((p != torch.arange(p.numel())).sum() for p in self.permutations.values()))

    def to_dict(self) -> dict:
        return {"method": self.method, "iterations": self.iterations,
                "objective_trace": list(self.objective_trace), "converged": self.converged,
                "initial_objective": self.initial_objective, "seconds": self.seconds,
                "changed_units": self.changed_units,
                "permutation_sizes": {k: int(v.numel()) for k, v in self.permutations.items()},
                "permutations": {k: v.tolist() for k, v in self.permutations.items()},
                "notes": list(self.notes), "unmatched": list(self.unmatched),
                "function_error": self.function_error, "function_scale": self.function_scale}

    def plot(self, ax=None):
        """The matching objective after each pass."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(4.5, 3)
        values = ([self.initial_objective] if self.initial_objective is not None else []) + list(
            self.objective_trace)
        ax.plot(range(len(values)), values, marker="o")
        ax.set_xlabel("pass")
        ax.set_ylabel("matching objective")
        ax.set_title(f"{self.method} matching")
        return ax


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (detached)."""
    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update({k: v.detach() for k, v in model.named_buffers()})
    return state


def permute_model(model: nn.Module, spec: PermutationSpec,
                  perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with its units permuted (same function)."""
    state = apply_permutations(model_state(model), spec, perms)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensor in list(out.named_parameters()) + list(out.named_buffers()):
            tensor.copy_(state[name])
    return out


def _inner(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Σ_k ⟨a_k, b_k⟩ (each term in the tensors' dtype, summed in Python floats)."""
    return sum(float(torch.dot(a[k].reshape(-1), b[k].reshape(-1))) for k in a)


def weight_matching(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                    spec: PermutationSpec, *, max_iter: int = 100, tol: float = 0.0,
                    seed: int | None = 0, init: Mapping[str, torch.Tensor] | None = None,
                    restarts: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[float], bool]:
    """Git Re-Basin weight matching by coordinate descent over permutations.

    Maximises Σ_k ⟨θ_A,k, π(θ_B)_k⟩. For one permutation P with the others fixed, the
    objective is ⟨P, C⟩ with C = Σ_{(k, a) ∋ P} W_A,k^(a) (W̃_B,k^(a))ᵀ, where W^(a) is tensor
    k with axis a moved first and flattened, and W̃_B has every other permutation applied:
    a linear assignment problem solved exactly by ``linear_sum_assignment(maximize=True)``.
    Permutations are visited in a random order each pass; the loop stops when a full pass
    improves nothing (Git Re-Basin's rule, ``tol=0``) or, with ``tol > 0``, when a pass
    raises the objective by less than ``tol`` times its value.

    Three exact economies (the permutations are those of the plain algorithm, tested unit
    by unit): a permutation whose cost matrix reads no permutation changed since its last
    solve is skipped; C is updated by the units that moved (:class:`_CostMatrices`); and
    each assignment starts from the dual potentials of the permutation's previous one
    (:func:`assignment.solve_assignment`), which leaves the optimum unchanged.

    ``restarts`` runs the descent that many times by iterated local search (each restart
    starts from the best permutations so far with about half of them redrawn at random,
    in another visiting order) and keeps the highest final objective; ``None``: 1 for
    plain specs and for a descent started at ``init``, 64 for specs with attention heads
    (see :func:`heads.best_of_restarts`).

    Returns (permutations, objective after each pass of the kept run, converged).

    References
    ----------
    Ainsworth, Hayase & Srinivasa (2023), "Git Re-Basin", Algorithm 1.
    """
    from .heads import best_of_restarts, default_restarts

    if restarts is None:  # refining a given start (``init``) is one descent unless asked
        restarts = default_restarts(spec) if init is None else 1
    restarts = int(restarts)
    if restarts > 1:
        return best_of_restarts(
            lambda s, start: weight_matching(params_a, params_b, spec, max_iter=max_iter,
                                             tol=tol, seed=s, init=start, restarts=1),
            spec, restarts, seed, init,
            bound=float(np.sqrt(_inner(params_a, params_a) * _inner(params_b, params_b))))
    if spec.structure:  # attention heads, fused projections
        from .heads import structured_weight_matching

        return structured_weight_matching(params_a, params_b, spec, max_iter=max_iter, tol=tol,
                                          seed=seed, init=init)
    rng = np.random.default_rng(None if seed is None else int(seed) if not isinstance(
        seed, torch.Generator) else int(seed.initial_seed()))
    names = [k for k in params_a]
    groups = spec.perm_to_axes(names)
    sizes = dict(spec.perms)
    perms = {p: (torch.as_tensor(init[p]).long() if init is not None and p in init
                 else torch.arange(n)) for p, n in sizes.items()}
    a_side = {k: params_a[k].detach() for k in names}
    b_side = {k: params_b[k].detach() for k in names}
    costs = _CostMatrices(a_side, b_side, spec, groups)
    order = [p for p in sizes if groups[p]]
    # the other permutations each cost matrix reads; a permutation whose inputs have not
    # changed since it was last solved has the same cost matrix, and solving it again would
    # change nothing (it already holds that problem's optimum, or the solver's answer did
    # not beat it): it is skipped, with exactly the same outcome
    reads = {p: {other for k, axis in groups[p] for a, other in enumerate(spec.axes[k])
                 if other is not None and a != axis} for p in order}
    changes = dict.fromkeys(sizes, 0)  # how many times each permutation has changed
    solved_at: dict[str, dict[str, int]] = {}
    potentials: dict[str, np.ndarray] = {}
    trace: list[float] = []
    converged = False
    for _ in range(max(int(max_iter), 1)):
        improved = False
        for index in rng.permutation(len(order)):
            p = order[index]
            n = sizes[p]
            inputs = {other: changes[other] for other in reads[p]}
            if solved_at.get(p) == inputs:
                continue
            solved_at[p] = inputs
            cost = costs.matrix(p, perms)  # updated in place by the next call for p
            # exact; warm-started with the dual potentials of this permutation's last solve
            cols, potentials[p] = solve_assignment(cost.numpy(), potentials.get(p),
                                                   perms[p].cpu().numpy())
            old = float(cost[torch.arange(n), perms[p]].sum())
            new = float(cost.numpy()[np.arange(n), cols].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[p] = torch.as_tensor(cols, dtype=torch.long)
                changes[p] += 1
                improved = True
        # a pass that changed nothing leaves the objective as it was, to the last bit
        trace.append(trace[-1] if trace and not improved
                     else _inner(a_side, apply_permutations(b_side, spec, perms)))
        small = (tol > 0 and len(trace) > 1
                 and trace[-1] - trace[-2] < tol * max(abs(trace[-2]), 1e-12))
        if not improved or small:
            converged = True
            break
    return perms, trace, converged


class _CostMatrices:
    """The cost matrix C_P = Σ_{(k, a) ∋ P} W_A,k^(a) (W̃_B,k^(a))ᵀ of every permutation,
    float64 on the CPU, kept up to date as the other permutations move.

    Terms whose tensor has no other permuted axis never change and are computed once. The
    first matrix of a permutation is one GEMM per term in the parameters' dtype and device
    (as the plain algorithm). Later, when each term saw a single other permutation move
    only the units S (|S| ≤ n/2), only B's slices at S along that axis changed, so the
    matrix is updated in place by their contribution W_A[S] (W̃_B,new[S] − W̃_B,old[S])ᵀ
    (the sum over the other axes restricted to S): |S|/n of a GEMM, with the rounding of
    a GEMM of those slices; otherwise it is recomputed.
    """

    def __init__(self, a_side: Mapping[str, torch.Tensor], b_side: Mapping[str, torch.Tensor],
                 spec: PermutationSpec, groups: Mapping[str, list[tuple[str, int]]]) -> None:
        self.a_side, self.b_side, self.spec = a_side, b_side, spec
        self.terms: dict[str, list[tuple[str, int]]] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        for p, axes in groups.items():
            for k, axis in axes:
                if all(q is None or a == axis for a, q in enumerate(spec.axes[k])):
                    product = self._product(k, axis, {})
                    self.fixed[p] = self.fixed[p] + product if p in self.fixed else product
                else:
                    self.terms.setdefault(p, []).append((k, axis))
        self.cost: dict[str, torch.Tensor] = {}
        self.used: dict[str, dict[tuple[str, int], dict[int, torch.Tensor]]] = {}

    def _others(self, k: str, axis: int, perms: Mapping[str, torch.Tensor]
                ) -> dict[int, torch.Tensor]:
        return {a: perms[q] for a, q in enumerate(self.spec.axes[k]) if q is not None and a != axis}

    def _flat(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)

    def _product(self, k: str, axis: int, others: Mapping[int, torch.Tensor]) -> torch.Tensor:
        permuted = self.b_side[k]
        for a, perm in others.items():
            permuted = permuted.index_select(a, perm.to(permuted.device))
        # in the parameters' own dtype and device; summed in float64 on the CPU
        return (self._flat(self.a_side[k], axis) @ self._flat(permuted, axis).T).double().cpu()

    def _delta(self, k: str, axis: int, others: Mapping[int, torch.Tensor],
               used: Mapping[int, torch.Tensor], moved: int, units: torch.Tensor) -> torch.Tensor:
        w_a, w_b = self.a_side[k], self.b_side[k]
        new, old = w_b, w_b
        for a, perm in others.items():
            new = new.index_select(a, (perm[units] if a == moved else perm).to(w_b.device))
            old = old.index_select(a, (used[a][units] if a == moved else perm).to(w_b.device))
        part = self._flat(w_a.index_select(moved, units.to(w_a.device)), axis)
        return (part @ (self._flat(new, axis) - self._flat(old, axis)).T).cpu()

    def matrix(self, p: str, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """C_p at the current ``perms`` (the returned tensor is updated in place by the next
        call for ``p``)."""
        current = {(k, axis): self._others(k, axis, perms) for k, axis in self.terms.get(p, [])}
        if p in self.cost:
            updates: list | None = []
            for (k, axis), others in current.items():
                used = self.used[p][(k, axis)]
                moved = [a for a in others
                         if others[a] is not used[a] and not torch.equal(others[a], used[a])]
                if not moved:
                    continue
                units = (torch.nonzero(others[moved[0]] != used[moved[0]]).squeeze(1)
                         if len(moved) == 1 else None)
                if units is None or 2 * units.numel() > others[moved[0]].numel():
                    updates = None
                    break
                updates.append((k, axis, others, used, moved[0], units))
            if updates is not None:
                for update in updates:
                    self.cost[p].add_(self._delta(*update))  # float64 += parameters' dtype
                self.used[p] = current
                return self.cost[p]
        cost = self.fixed[p].clone() if p in self.fixed else None
        for (k, axis), others in current.items():
            product = self._product(k, axis, others)
            cost = product if cost is None else cost.add_(product)
        self.cost[p], self.used[p] = cost, current
        return cost


def _input_batches(data: Any, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` inputs from the data, in batches."""
    from ridgeline.data.dataset import Dataset

    if isinstance(data, Dataset):
        inputs = data.inputs
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        inputs = data[0]
    elif isinstance(data, torch.Tensor):
        inputs = data
    else:
        batches, count = [], 0
        for item in data:
            x = item[0] if isinstance(item, (tuple, list)) else item
            batches.append(x[:limit - count])
            count += batches[-1].shape[0]
            if count >= limit:
                break
        if not batches:
            raise DataError("activation matching needs data: the loader yielded no batch.")
        return batches
    if inputs.shape[0] == 0:
        raise DataError("activation matching needs data: got an empty dataset.")
    return [inputs[:limit]]


def as_model_input(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Inputs moved to the model's device, floating inputs cast to its dtype."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    inputs = inputs.to(device)
    if dtype is not None and inputs.is_floating_point():
        inputs = inputs.to(dtype)
    return inputs


def check_inputs(model: nn.Module, inputs: torch.Tensor) -> None:
    """Raise ShapeMismatchError when the model cannot be applied to the inputs."""
    from ridgeline.objective import module_mode

    try:
        with torch.no_grad(), module_mode(model, False):
            model(inputs[:2])
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ShapeMismatchError(
            f"the model cannot be applied to inputs of shape {tuple(inputs.shape[1:])} per "
            f"example: {str(exc).splitlines()[0]}. Check that the data matches the model's "
            "input size.") from exc


def _site_nodes(graph_module: Any, tracer: Any, spec_labels: dict[int, str]) -> dict[str, list[tuple[Any, int]]]:
    """For each permutation, the graph values it acts on: outputs of nonlinearities where
    there are any, otherwise every value carrying it."""
    from .permutation_spec import _op_name

    uf = tracer.uf
    acts: dict[str, list[tuple[Any, int]]] = {}
    anywhere: dict[str, list[tuple[Any, int]]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        value = tracer.vars.get(node)
        if not isinstance(value, tuple) or len(value) < 2:
            continue
        for axis, var in enumerate(value):
            label = spec_labels.get(uf.find(var))
            if label is None:
                continue
            anywhere.setdefault(label, []).append((node, axis))
            if _op_name(node.target) in ACTIVATIONS:
                acts.setdefault(label, []).append((node, axis))
            break
    return {p: acts.get(p) or anywhere.get(p, []) for p in set(acts) | set(anywhere)}


class _Recorder(torch.fx.Interpreter):
    """Runs a traced graph and keeps the values of the ``wanted`` nodes."""

    def __init__(self, graph_module: Any, wanted: set) -> None:
        super().__init__(graph_module)
        self.wanted, self.recorded = wanted, {}

    def run_node(self, n: Any) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.recorded[n] = out.detach()
        return out


class _Moments:
    """Running sums for the cross-correlation of two sets of unit activations."""

    def __init__(self, n: int) -> None:
        z = torch.zeros(n, dtype=torch.float64)
        self.count, self.sa, self.sb, self.saa, self.sbb = 0, z.clone(), z.clone(), z.clone(), z.clone()
        self.sab = torch.zeros(n, n, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> torch.Tensor:
        m = max(self.count, 1)
        mean_a, mean_b = self.sa / m, self.sb / m
        std_a = (self.saa / m - mean_a ** 2).clamp_min(0).sqrt()
        std_b = (self.sbb / m - mean_b ** 2).clamp_min(0).sqrt()
        cov = self.sab / m - torch.outer(mean_a, mean_b)
        return cov / (torch.outer(std_a, std_b) + 1e-12)


def activation_matching(model_a: nn.Module, model_b: nn.Module, data: Any, spec: PermutationSpec,
                        *, max_examples: int = 4096, first: Traced | None = None
                        ) -> tuple[dict[str, torch.Tensor], float]:
    """Git Re-Basin activation matching: for each permutation, the assignment maximising
    the summed Pearson correlation ρ_ij = cov(z_A,i, z_B,j)/(σ_A,i σ_B,j) of the two
    networks' unit activations over the data (all positions of every value the
    permutation acts on; outputs of nonlinearities where there are any).

    Returns (permutations, total correlation of the matched units). A permutation whose
    units appear in no value of the forward pass (e.g. it acts only on tensors the forward
    pass never uses) cannot be matched: it is returned as the identity with a
    RuntimeWarning naming it (:func:`align` records it in ``unmatched`` and ``notes``).

    References
    ----------
    Ainsworth, Hayase & Srinivasa (2023), "Git Re-Basin", §3.1.
    """
    perms, total, unmatched = _match_activations(model_a, model_b, data, spec,
                                                 max_examples=max_examples, first=first)
    if unmatched:
        warnings.warn(unmatched_note(unmatched), RuntimeWarning, stacklevel=2)
    return perms, total


def unmatched_note(unmatched: list[str] | tuple[str, ...]) -> str:
    return (f"activation matching saw no activations for permutation(s) {list(unmatched)} "
            "(no value of the forward pass carries their units), so they are left as the "
            "identity; use method='weights' to match them by their weights.")


def _match_activations(model_a: nn.Module, model_b: nn.Module, data: Any, spec: PermutationSpec,
                       *, max_examples: int = 4096, first: Traced | None = None
                       ) -> tuple[dict[str, torch.Tensor], float, list[str]]:
    """:func:`activation_matching`, also returning the permutations it could not match."""
    from ridgeline.objective import module_mode

    state_a, state_b = model_state(model_a), model_state(model_b)
    moments: dict[str, _Moments] = {}
    cache: dict[tuple[int, ...], Traced] = {}
    if first is not None:
        cache[first.input_shape] = first
    for inputs in _input_batches(data, max_examples):
        inputs = as_model_input(model_a, inputs)
        key = tuple(inputs.shape)
        if key not in cache:
            check_inputs(model_a, inputs)
            cache[key] = traced(model_a, inputs)
        tr = cache[key]
        # the traced permutations under the names of the spec in use (it may be manual)
        renamed: dict[str, str] = {}
        for name, axes in tr.roots.items():
            for axis, root in enumerate(axes):
                if root in tr.labels and spec.axes.get(name, ())[axis:axis + 1] not in ((), (None,)):
                    renamed.setdefault(tr.labels[root], spec.axes[name][axis])
        for label in tr.labels.values():  # structured parts carried by no parameter
            if label in spec.perms:
                renamed.setdefault(label, label)
        sites = {renamed[label]: items
                 for label, items in _site_nodes(tr.graph_module, tr.tracer, tr.labels).items()
                 if label in renamed}
        wanted = {node for items in sites.values() for node, _ in items}
        values: dict[str, dict[Any, torch.Tensor]] = {}
        for tag, state in (("a", state_a), ("b", state_b)):
            recorder = _Recorder(tr.graph_module, wanted)
            with torch.no_grad(), module_mode(model_a, False):
                recorder.run(*[state[k] for k in tr.names], inputs)
            values[tag] = recorder.recorded
        for perm, items in sites.items():
            if perm not in spec.perms:
                continue
            n = spec.perms[perm]
            acc = moments.setdefault(perm, _Moments(n))
            for node, axis in items:
                za = values["a"][node].movedim(axis, -1).reshape(-1, n)
                zb = values["b"][node].movedim(axis, -1).reshape(-1, n)
                acc.add(za, zb)
    perms: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    total = 0.0
    if spec.structure:  # heads and segments: assignments over heads, then within them
        from .heads import distribute_costs, solve_costs

        corrs = {perm: acc.correlation() for perm, acc in moments.items()}
        costs = distribute_costs(spec, corrs)
        perms = solve_costs(spec, costs)
        unmatched = [p for p in spec.perms if p not in costs and not any(
            p in e[1] for e in spec.structure.values() if e[0] == "cat")]
        total = sum(float(c[torch.arange(c.shape[0]), perms[p]].sum()) for p, c in corrs.items())
        return perms, total, unmatched
    for perm, n in spec.perms.items():
        if perm not in moments:
            perms[perm] = torch.arange(n)
            unmatched.append(perm)
            continue
        corr = moments[perm].correlation()
        rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        perms[perm] = torch.as_tensor(cols, dtype=torch.long)
        total += float(corr.numpy()[rows, cols].sum())
    return perms, total, unmatched


def align(model_a: nn.Module, model_b: nn.Module, *, method: str = "weights", data: Any = None,
          spec: PermutationSpec | Mapping | None = None, max_iter: int = 100,
          tol: float = 0.0, seed: int | None = 0, example_input: torch.Tensor | None = None,
          restarts: int | None = None) -> AlignmentResult:
    """Permute model B's hidden units to match model A's (Git Re-Basin).

    Parameters
    ----------
    model_a, model_b : nn.Module
        Two networks of the same architecture.
    method : {"weights", "activations"}
        ``"weights"``: weight matching, coordinate descent maximising Σ⟨θ_A, π(θ_B)⟩ (no
        data needed). ``"activations"``: match units by the correlation of their
        activations on ``data``.
    data : (inputs, targets), Dataset, DataLoader or tensor of inputs
        Required for ``method="activations"`` (up to 4096 examples are used).
    spec : PermutationSpec or dict, optional
        Which axes each permutation acts on; derived by tracing model A when omitted (see
        :func:`permutation_spec`).
    max_iter : int
        Maximum passes of weight matching.
    tol : float
        Weight matching stops when a full pass improves nothing (``tol=0``, the rule of
        Git Re-Basin) or when it raises Σ⟨θ_A, π(θ_B)⟩ by less than ``tol`` times its value
        (late passes of trained networks creep up by ~0.01 % each and barely move the
        barrier; ``tol=1e-3`` is ~1.5× faster on a 2×512 MLP, at a ~1 % higher barrier).
    seed : int
        Seeds the random order in which weight matching visits the permutations.
    restarts : int, optional
        Weight matching runs this many times (the first is the plain run; each other one
        restarts from the best so far with about half of the permutations redrawn at
        random, in another visiting order), keeping the highest objective Σ⟨θ_A, π(θ_B)⟩
        — never the loss. ``None``: 1 for specs without attention heads (Git Re-Basin), 64
        for transformers, whose coordinate descent stops in poor local optima.

    Returns
    -------
    AlignmentResult
        ``model`` is a permuted copy of B computing exactly B's function.

    References
    ----------
    Ainsworth, Hayase & Srinivasa (2023), "Git Re-Basin: merging models modulo permutation
    symmetries", ICLR.
    """
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise TypeError("align needs two torch.nn.Module models.")
    state_a, state_b = model_state(model_a), model_state(model_b)
    check_same_structure(state_a, state_b)
    if max_iter < 1 or tol < 0:
        raise ConfigError(f"max_iter must be ≥ 1 and tol ≥ 0; got max_iter={max_iter}, tol={tol}.")
    if restarts is not None and (isinstance(restarts, bool) or not isinstance(restarts, int)
                                 or restarts < 1):
        raise ConfigError(f"restarts must be an integer ≥ 1 (or None for the default); got "
                          f"{restarts!r}.")
    if method not in ("weights", "activations"):
        raise ConfigError(f"method must be 'weights' or 'activations', got {method!r}.")
    if method == "activations" and data is None:
        raise DataError("activation matching needs data: pass data=(inputs, targets), a "
                        "Dataset or a DataLoader, or use method='weights'.")
    began = time.perf_counter()
    if example_input is None and data is not None:
        example_input = _input_batches(data, 2)[0][:2]
    if example_input is not None:
        example_input = as_model_input(model_a, example_input)
        check_inputs(model_a, example_input)
    first = None
    if spec is None and method == "activations":
        batch = as_model_input(model_a, _input_batches(data, 4096)[0])
        check_inputs(model_a, batch)
        first = traced(model_a, batch)
        spec = first.spec
    elif spec is None:
        if example_input is None:
            from .permutation_spec import guess_example_input

            example_input = guess_example_input(model_a)
        spec = _traced_spec(model_a, example_input)
    else:
        spec = coerce_spec(spec, model_a)
    if spec.head_groups and spec.source == "traced":
        _check_same_heads(spec, model_b, example_input)
    params_a = {k: v.detach() for k, v in model_a.named_parameters()}
    params_b = {k: v.detach() for k, v in model_b.named_parameters()}
    initial = _inner(params_a, params_b)
    if method == "weights":
        perms, trace_values, converged = weight_matching(params_a, params_b, spec,
                                                         max_iter=max_iter, tol=tol, seed=seed,
                                                         restarts=restarts)
        iterations = len(trace_values)
    else:
        perms, total, unmatched = _match_activations(model_a, model_b, data, spec, first=first)
        trace_values, converged, iterations = [total], True, 1
        initial = None
    notes = tuple(spec.notes)
    if method == "activations" and unmatched:
        notes += (unmatched_note(unmatched),)
    aligned = permute_model(model_b, spec, perms)
    error, scale = function_change(model_b, aligned, example_input)
    return AlignmentResult(aligned, perms, iterations, tuple(trace_values), converged, method,
                           spec, time.perf_counter() - began, initial, notes,
                           tuple(unmatched) if method == "activations" else (), error, scale)


# torch.nn layers whose forward is fixed by their class and the settings their
# ``extra_repr`` prints: a model built only from these, without hooks, traces to the same
# spec whenever the layers, settings, tensor shapes and input shape are the same
_PLAIN_LAYERS = (nn.Sequential, nn.ModuleList, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                 nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                 nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU,
                 nn.Softplus, nn.Identity, nn.Flatten, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_SPEC_CACHE: dict[tuple, PermutationSpec] = {}


def _architecture_key(model: nn.Module, inputs: torch.Tensor) -> tuple | None:
    """What the traced spec of a model of plain torch.nn layers depends on; None for any
    other model (custom forward code, hooks), which is traced every time."""
    from torch.nn.modules import module as module_globals

    if (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
            or module_globals._global_module_registration_hooks):
        return None
    layers = []
    for name, module in model.named_modules():
        if (type(module) not in _PLAIN_LAYERS or "forward" in vars(module)
                or module._forward_hooks or module._forward_pre_hooks):
            return None
        layers.append((name, type(module), module.extra_repr(), module.training))
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device.type)
                    for name, t in [*model.named_parameters(), *model.named_buffers()])
    return (tuple(layers), tensors, tuple(inputs.shape), inputs.dtype, inputs.device.type)


def _traced_spec(model: nn.Module, inputs: torch.Tensor) -> PermutationSpec:
    """:func:`permutation_spec` of the model, traced once per architecture of plain
    torch.nn layers (tracing costs ~10 ms even for an MLP; the spec is a pure function of
    the key above) and every time for other models."""
    key = _architecture_key(model, inputs)
    if key is None:
        return permutation_spec(model, example_input=inputs)
    if key not in _SPEC_CACHE:
        if len(_SPEC_CACHE) >= 64:
            _SPEC_CACHE.pop(next(iter(_SPEC_CACHE)))
        _SPEC_CACHE[key] = permutation_spec(model, example_input=inputs)
    return copy.deepcopy(_SPEC_CACHE[key])


def _heads(spec: PermutationSpec) -> list[tuple[int, int]]:
    return sorted((int(e[2]), int(e[3])) for e in spec.structure.values() if e[0] == "heads")


def _check_same_heads(spec_a: PermutationSpec, model_b: nn.Module,
                      inputs: torch.Tensor | None) -> None:
    """Models with equal shapes may still split their features into different heads."""
    try:
        spec_b = permutation_spec(model_b, example_input=inputs)
    except Exception:  # noqa: BLE001 - B traced like A; a failure here is reported by A's trace
        return
    if _heads(spec_a) != _heads(spec_b):
        raise ConfigError(
            f"models A and B split their attention features into different heads: A has "
            f"(heads, features per head) {_heads(spec_a)}, B has {_heads(spec_b)}. Heads can "
            "only be matched between models with the same head counts; align models built "
            "with the same configuration.")


def function_change(model_b: nn.Module, aligned: nn.Module, inputs: torch.Tensor | None
                    ) -> tuple[float | None, float | None]:
    """(max |f_B(x) − f_πB(x)|, max |f_B(x)|) on the example batch: the permuted model must
    compute B's function, so the first number is round-off (None without an input)."""
    from ridgeline.objective import module_mode
    from ridgeline.outputs import as_logits

    if inputs is None:
        return None, None
    with torch.no_grad(), module_mode(model_b, False), module_mode(aligned, False):
        out_b = as_logits(model_b(inputs)).double()
        out_p = as_logits(aligned(inputs)).double()
    return float((out_b - out_p).abs().max()), float(out_b.abs().max())
