"""Matching with structured permutations: attention heads and fused projections.

A :class:`~ridgeline.connectivity.permutation_spec.PermutationSpec` with a ``structure``
has permutations that are not free: an axis of H·d features read as H heads of d features
(heads move as wholes, each head's features within it) and axes made of segments (a fused
QKV projection). Both matchings here reduce every such axis to the same linear assignment
problems as Git Re-Basin, one level at a time:

* the cost of a flat permutation of an axis, C (n × n, ⟨P, C⟩ is the objective), is cut into
  its segments' diagonal blocks (a segment's permutation sees only its own block);
* for a head permutation σ shared by the "heads" permutations F of one attention layer
  (Q/K features and V/output features), the similarity of head h of A with head h' of B is
  S[h, h'] = Σ_F max_τ Σ_j C_F[(h, j), (h', τ(j))] — the best within-head assignment of the
  d×d block — and σ = argmax_σ Σ_h S[h, σ(h)]; then each head's τ_h solves its block
  C_F[(h, ·), (σ(h), ·)] (Verma & Elbayad 2024, "Merging text transformer models from
  different initializations"; Imfeld et al. 2024, "Transformer fusion with optimal
  transport", match heads as wholes in the same way).

Grouped-query attention (G key/value heads, each read by a group of r query heads) adds
"grouped" permutations (the query projection's output and the output projection's input:
G groups × r query heads × d features). The head step of such a layer moves the G groups:
a group's similarity adds, to its key and value heads' blocks, the best matching of its r
query heads (an r × r assignment on the query heads' best d × d matchings, summed over Q
and the output projection, which share it); then within each matched group the query-head
order ρ and the feature orders τ (one shared by the key head and all Q blocks of the group,
one by the value head and all output-projection blocks) are solved alternately, each an
exact assignment given the others, until they stop changing.

Multi-query attention (one key/value head, G = 1) is the same with one group: its head
step is trivial, and ρ (the order of all r query heads) and τ, υ (the one q/k feature order
of K's outputs and every Q block, the one value order of V's outputs and every output-
projection block) are solved alternately in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .permutation_spec import PermutationSpec, expand_permutations

__all__ = ["StructuredState", "structured_weight_matching", "solve_costs", "best_of_restarts",
           "default_restarts", "kick"]

#: restarts of weight matching for specs with attention heads when ``restarts=None``
STRUCTURED_RESTARTS = 64


class StructuredState:
    """The free parts of every permutation of a structured spec, and their flat form."""

    def __init__(self, spec: PermutationSpec) -> None:
        self.spec = spec
        self.free = {p: torch.arange(n) for p, n in spec.perms.items() if p not in spec.structure}
        self.sigma = {g: torch.arange(h) for g, h in spec.head_groups.items()}
        self.tau = {f: torch.arange(e[3]).repeat(e[2], 1) for f, e in spec.structure.items()
                    if e[0] == "heads" and e[4]}
        self.rho = {q: torch.arange(r).repeat(g, 1) for q, (g, r) in spec.query_groups.items()}

    def start_from(self, flat: Mapping[str, torch.Tensor]) -> None:
        """Take free parts from flat permutations (e.g. a previous matching's result)."""
        for p in self.free:
            if p in flat:
                self.free[p] = torch.as_tensor(flat[p]).long()
        for f, e in self.spec.structure.items():
            if e[0] == "grouped" and f in flat:
                g, r, d = int(e[2]), int(e[3]), int(e[4])
                blocks = torch.as_tensor(flat[f]).long().reshape(g, r, d)[:, :, 0] // d
                sigma = blocks[:, 0] // r
                if e[1] is not None:
                    self.sigma[e[1]] = sigma
                if e[6] is not None:
                    self.rho[e[6]] = blocks - sigma[:, None] * r
            if e[0] != "heads" or f not in flat:
                continue
            h, d = int(e[2]), int(e[3])
            value = torch.as_tensor(flat[f]).long().reshape(h, d)
            sigma = value[:, 0] // d
            if e[1] is not None:
                self.sigma[e[1]] = sigma
            if e[4]:
                self.tau[f] = value - sigma[:, None] * d

    def flat(self) -> dict[str, torch.Tensor]:
        return expand_permutations(self.spec, self.free, self.sigma, self.tau, self.rho)

    def apply(self, kind: str, key: str, solved: Mapping[str, Any]) -> None:
        """Take one assignment unit's solution (see :meth:`units`)."""
        if kind == "free":
            self.free[key] = solved["free"]
            return
        if key in self.sigma:
            self.sigma[key] = solved["sigma"]
        self.tau.update(solved["tau"])
        self.rho.update(solved["rho"])

    def units(self) -> list[tuple[str, str, list[str]]]:
        """(kind, key, the permutations whose cost it needs): one per assignment step."""
        units = [("free", p, [p]) for p in self.free]
        groups: dict[str, list[str]] = {}
        structure = self.spec.structure
        for f, e in structure.items():
            if e[0] == "heads" and (e[1] is not None or e[4]):
                groups.setdefault(e[1] if e[1] is not None else "within:" + f, []).append(f)
        for f, e in structure.items():  # grouped-query: with their key/value heads
            if e[0] != "grouped":
                continue
            if e[1] is not None:
                key = e[1]
            elif e[5] is not None and structure[e[5]][4]:
                key = "within:" + e[5]
            elif e[6] is not None:
                key = "rho:" + e[6]
            else:
                continue
            groups.setdefault(key, []).append(f)
        units += [("heads", g, members) for g, members in groups.items()]
        return units


def _contains(spec: PermutationSpec) -> dict[str, set[str]]:
    """Permutation → every permutation it is made of (itself included)."""
    out: dict[str, set[str]] = {}

    def visit(name: str) -> set[str]:
        if name not in out:
            entry = spec.structure.get(name)
            found = {name}
            if entry is not None and entry[0] == "cat":
                for part in entry[1]:
                    if part is not None:
                        found |= visit(part)
            out[name] = found
        return out[name]

    for name in spec.perms:
        visit(name)
    return out


def _distribute(spec: PermutationSpec, name: str, cost: torch.Tensor, targets: set[str],
                into: dict[str, torch.Tensor]) -> None:
    """Add the blocks of a flat cost that belong to ``targets`` (descending segments)."""
    if name in targets:
        into[name] = into.get(name, 0) + cost
    entry = spec.structure.get(name)
    if entry is not None and entry[0] == "cat":
        offset = 0
        for part, size in zip(entry[1], entry[2]):
            if part is not None:
                _distribute(spec, part, cost[offset:offset + size, offset:offset + size],
                            targets, into)
            offset += int(size)


def _lap(cost: np.ndarray) -> tuple[np.ndarray, float]:
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols, float(cost[rows, cols].sum())


def solve_unit(spec: PermutationSpec, kind: str, key: str, members: list[str],
               costs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The best assignment of one unit given the costs of its permutations (heads first,
    then the query heads and features within each matched head or group)."""
    if kind == "free":
        cols, _ = _lap(costs[key].numpy())
        return {"free": torch.as_tensor(cols, dtype=torch.long)}
    structure = spec.structure
    first = structure[members[0]]
    h = int(first[2])
    has_group = first[1] is not None
    pairs = [(a, b) for a in range(h) for b in (range(h) if has_group else (a,))]
    score = np.zeros((h, h))
    blocks = {}
    heads_members = [f for f in members if structure[f][0] == "heads"]
    grouped = [f for f in members if structure[f][0] == "grouped"]
    for f in heads_members:
        d = int(structure[f][3])
        c = costs[f].numpy().reshape(h, d, h, d).transpose(0, 2, 1, 3)  # [h, h', j, j']
        blocks[f] = c
        within = structure[f][4]
        for a, b in pairs:
            score[a, b] += _lap(c[a, b])[1] if within else float(np.trace(c[a, b]))
    # grouped-query: the query heads of group a (A) and b (B), each pair matched at its best
    # features, summed over the permutations sharing one query-head order, r × r per pair
    relaxed: dict[str, np.ndarray] = {}
    for f in grouped:
        _, _, g, r, d, base, rho = structure[f]
        c = costs[f].numpy().reshape(g, r, d, g, r, d).transpose(0, 3, 1, 4, 2, 5)
        blocks[f] = c  # [a, b, i, i', j, j']
        within = base is not None and structure[base][4]
        acc = relaxed.setdefault(rho if rho is not None else "fixed:" + f, np.zeros((g, g, r, r)))
        for a, b in pairs:
            for i in range(r):
                for i2 in range(r) if rho is not None else (i,):
                    acc[a, b, i, i2] += (_lap(c[a, b, i, i2])[1] if within
                                         else float(np.trace(c[a, b, i, i2])))
    for name, acc in relaxed.items():
        for a, b in pairs:
            score[a, b] += (float(np.trace(acc[a, b])) if name.startswith("fixed:")
                            else _lap(acc[a, b])[1])
    sigma = _lap(score)[0] if has_group else np.arange(h)
    orders = [name for name in relaxed if not name.startswith("fixed:")]
    tau_rows: dict[str, list[np.ndarray]] = {f: [] for f in heads_members if structure[f][4]}
    rho_rows: dict[str, list[np.ndarray]] = {name: [] for name in orders}
    for a in range(h):
        b = int(sigma[a])
        rho_a = {name: _lap(relaxed[name][a, b])[0] for name in orders}
        for _ in range(50):  # alternate: features given query-head orders, and back
            tau_a = {}
            for f in tau_rows:
                m = blocks[f][a, b].copy()
                for q in grouped:
                    if structure[q][5] == f:
                        order = rho_a.get(structure[q][6], np.arange(structure[q][3]))
                        m += sum(blocks[q][a, b, i, order[i]] for i in range(len(order)))
                tau_a[f] = _lap(m)[0]
            new_rho = {}
            for name in orders:
                r = relaxed[name].shape[2]
                m = np.zeros((r, r))
                for q in grouped:
                    if structure[q][6] != name:
                        continue
                    base = structure[q][5]
                    d = blocks[q].shape[-1]
                    cols = tau_a[base] if base in tau_a else np.arange(d)
                    m += blocks[q][a, b][:, :, np.arange(d), cols].sum(-1)
                new_rho[name] = _lap(m)[0]
            if all(np.array_equal(new_rho[n], rho_a[n]) for n in orders):
                break
            rho_a = new_rho
        for f, t in tau_a.items():
            tau_rows[f].append(t)
        for name in orders:
            rho_rows[name].append(rho_a[name])
    tau = {f: torch.as_tensor(np.stack(rows), dtype=torch.long) for f, rows in tau_rows.items()}
    rho = {n: torch.as_tensor(np.stack(rows), dtype=torch.long) for n, rows in rho_rows.items()}
    return {"sigma": torch.as_tensor(sigma, dtype=torch.long), "tau": tau, "rho": rho}


def _value(flat: torch.Tensor, cost: torch.Tensor) -> float:
    return float(cost[torch.arange(flat.numel()), flat].sum())


def structured_weight_matching(params_a: Mapping[str, torch.Tensor],
                               params_b: Mapping[str, torch.Tensor], spec: PermutationSpec, *,
                               max_iter: int = 100, tol: float = 0.0, seed: int | None = 0,
                               init: Mapping[str, torch.Tensor] | None = None
                               ) -> tuple[dict[str, torch.Tensor], list[float], bool]:
    """Git Re-Basin weight matching (coordinate descent over assignment problems) for a
    spec with heads and segments; see the module docstring. Returns the flat
    permutations of ``spec.perms``, Σ_k ⟨θ_A,k, π(θ_B)_k⟩ after each pass, converged."""
    from .permutation_spec import apply_permutations

    def _inner(a, b):
        return sum(float(torch.dot(a[k].reshape(-1), b[k].reshape(-1))) for k in a)

    rng = np.random.default_rng(None if seed is None else int(seed.initial_seed())
                                if isinstance(seed, torch.Generator) else int(seed))
    state = StructuredState(spec)
    if init is not None:
        state.start_from(init)
    contains = _contains(spec)
    names = list(params_a)
    a_side = {k: params_a[k].detach() for k in names}
    b_side = {k: params_b[k].detach() for k in names}
    terms = [(k, axis, perm) for k in names for axis, perm in enumerate(spec.axes.get(k, ()))
             if perm is not None]
    a_mats = {(k, axis): a_side[k].movedim(axis, 0).reshape(a_side[k].shape[axis], -1)
              for k, axis, _ in terms}
    units = state.units()
    trace: list[float] = []
    converged = False
    for _ in range(max(int(max_iter), 1)):
        improved = False
        for index in rng.permutation(len(units)):
            kind, key, members = units[index]
            targets = set(members)
            flat = state.flat()
            costs: dict[str, torch.Tensor] = {}
            for k, axis, perm in terms:
                if not (contains[perm] & targets):
                    continue
                w_b = b_side[k]
                for other_axis, other in enumerate(spec.axes[k]):
                    if other is not None and other_axis != axis:
                        w_b = w_b.index_select(other_axis, flat[other].to(w_b.device))
                n = w_b.shape[axis]
                cost = (a_mats[(k, axis)] @ w_b.movedim(axis, 0).reshape(n, -1).T).double().cpu()
                _distribute(spec, perm, cost, targets, costs)
            if not costs:
                continue
            old = sum(_value(flat[m], costs[m]) for m in members if m in costs)
            solved = solve_unit(spec, kind, key, members, costs)
            saved = (dict(state.free), dict(state.sigma), dict(state.tau), dict(state.rho))
            state.apply(kind, key, solved)
            new_flat = state.flat()
            new = sum(_value(new_flat[m], costs[m]) for m in members if m in costs)
            if new > old + 1e-12 * max(1.0, abs(old)):
                improved = True
            else:
                state.free, state.sigma, state.tau, state.rho = saved
        trace.append(_inner(a_side, apply_permutations(b_side, spec, state.flat())))
        small = (tol > 0 and len(trace) > 1
                 and trace[-1] - trace[-2] < tol * max(abs(trace[-2]), 1e-12))
        if not improved or small:
            converged = True
            break
    return state.flat(), trace, converged


def default_restarts(spec: PermutationSpec) -> int:
    """Restarts of weight matching when none are asked for: 1 for plain specs (MLPs, CNNs:
    Git Re-Basin's single run), :data:`STRUCTURED_RESTARTS` for specs with attention heads,
    whose coordinate descent has many local optima (two MNIST-1D transformers: barriers
    1.18–2.16 over five visiting orders)."""
    return STRUCTURED_RESTARTS if spec.head_groups or spec.query_groups else 1


def restart_seed(seed: int | torch.Generator | None, restart: int) -> int | None:
    """The seed of restart ``restart``: ``seed`` itself for the first (so one restart is the
    plain run), then independent streams derived from (seed, restart); None stays None."""
    if restart == 0 or seed is None:
        return seed
    base = int(seed.initial_seed()) if isinstance(seed, torch.Generator) else int(seed)
    return int(np.random.SeedSequence([base, restart]).generate_state(1)[0])


def kick(spec: PermutationSpec, flat: Mapping[str, torch.Tensor], seed: int | None,
         fraction: float = 0.5) -> dict[str, torch.Tensor]:
    """The flat permutations ``flat`` with about ``fraction`` of the assignment units (at
    least one) replaced by uniformly random ones: a free permutation, or a head group's head
    order, the feature orders within its heads and (grouped-query attention) the query-head
    orders within its groups."""
    g = torch.Generator()
    if seed is None:
        g.seed()  # fresh entropy, leaving torch's global generator alone
    else:
        g.manual_seed(int(seed))
    state = StructuredState(spec)
    state.start_from(flat)
    units = state.units()
    if not units:
        return dict(flat)
    chosen = [i for i in range(len(units)) if float(torch.rand(1, generator=g)) < fraction]
    if not chosen:
        chosen = [int(torch.randint(len(units), (1,), generator=g))]
    for i in chosen:
        kind, key, members = units[i]
        if kind == "free":
            state.free[key] = torch.randperm(spec.perms[key], generator=g)
            continue
        if key in state.sigma:
            state.sigma[key] = torch.randperm(len(state.sigma[key]), generator=g)
        for m in members:
            if m in state.tau:
                h, d = state.tau[m].shape
                state.tau[m] = torch.stack([torch.randperm(d, generator=g) for _ in range(h)])
            rho = spec.structure[m][6] if spec.structure[m][0] == "grouped" else None
            if rho is not None:
                groups, r = state.rho[rho].shape
                state.rho[rho] = torch.stack([torch.randperm(r, generator=g)
                                              for _ in range(groups)])
    return state.flat()


def best_of_restarts(run: Callable[[int | None, Mapping[str, torch.Tensor] | None],
                                   tuple[dict[str, torch.Tensor], list[float], bool]],
                     spec: PermutationSpec, restarts: int, seed: int | torch.Generator | None,
                     init: Mapping[str, torch.Tensor] | None, bound: float | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[float], bool]:
    """Weight matching restarted by iterated local search, keeping the run with the highest
    final objective Σ_k ⟨θ_A,k, π(θ_B)_k⟩ (the matching's own objective: no data, no loss).

    Run 0 is the plain run (``seed``, started at ``init`` or the identity), so the result is
    never below it. Run r ≥ 1 starts from the best permutations so far with about half of
    the assignment units (free permutations; head groups with their within-head orders)
    drawn at random (:func:`kick`), and descends again in another random visiting order;
    it replaces the best when it ends strictly higher. Coordinate descent on transformers
    stops in poor local optima (two MNIST-1D transformers: barriers 1.18–2.16 over five
    visiting orders); kicks escape them better than independent restarts (Lourenço, Martin
    & Stützle 2003, "Iterated local search"). Stops early when the objective reaches
    ``bound`` (Cauchy–Schwarz: ‖θ_A‖‖θ_B‖, met only when π(θ_B) = θ_A up to scale).
    """
    best = run(seed, init)
    for r in range(1, max(int(restarts), 1)):
        if bound is not None and best[1][-1] >= bound * (1 - 1e-12):
            break
        s = restart_seed(seed, r)
        out = run(s, kick(spec, best[0], s))
        if out[1][-1] > best[1][-1]:
            best = out
    return best


def solve_costs(spec: PermutationSpec, costs: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """One assignment per unit from fixed costs (activation matching: correlations of the
    flat axes, already cut into segments); the flat permutations of ``spec.perms``."""
    state = StructuredState(spec)
    for kind, key, members in state.units():
        if not all(m in costs for m in members):
            continue
        state.apply(kind, key, solve_unit(spec, kind, key, members, costs))
    return state.flat()


def distribute_costs(spec: PermutationSpec, flat_costs: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Costs of every permutation from costs of flat axes (segments cut out, summed)."""
    out: dict[str, torch.Tensor] = {}
    targets = set(spec.perms)
    for name, cost in flat_costs.items():
        _distribute(spec, name, cost, targets, out)
    return out
