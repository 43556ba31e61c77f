"""Permutation specs: which axes of which tensors each hidden-unit permutation acts on.

Hidden units of a network can be permuted without changing its function, provided every
tensor axis that indexes those units is permuted the same way (Ainsworth et al. 2023, "Git
Re-Basin", §3). A :class:`PermutationSpec` records this: for every parameter and buffer,
one entry per axis naming the permutation acting on it (or ``None``).

:func:`permutation_spec` derives the spec automatically. It traces the model with
``torch.fx`` (``make_fx``: one concrete forward pass recorded as a graph of ATen ops), gives
every axis of every tensor in the graph a variable, and lets each op constrain the
variables with a union-find: a matrix product ties the contracted axes together, an
elementwise op ties its operands' axes to its output's, a normalisation ties its scale,
shift and running statistics to the channel axis, and the model's inputs and outputs are
fixed (data and logits are never permuted). Each free equivalence class left over is one
permutation. Residual additions therefore put a whole residual stream under one
permutation, exactly as Git Re-Basin's hand-written ResNet specs do.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError, UnsupportedOperationError

__all__ = ["PermutationSpec", "permutation_spec", "coerce_spec", "apply_permutations",
           "expand_permutations",
           "guess_example_input", "spec_for", "trace", "traced", "Traced",
           "SPEC_HELP"]

SPEC_HELP = (
    "Pass the spec by hand with spec={tensor_name: (perm_or_None, ...), ...}: one entry per "
    "parameter and floating-point buffer of the model, one item per tensor axis naming the "
    "permutation that acts on that axis (None for an axis that is never permuted), e.g. for "
    "nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)): {'0.weight': ('P0', None), "
    "'0.bias': ('P0',), '2.weight': (None, 'P0'), '2.bias': (None,)}. See docs/connectivity.md.")


@dataclass(frozen=True)
class PermutationSpec:
    """For every tensor (parameters and buffers, by name), the permutation on each axis.

    Attributes
    ----------
    perms : dict[str, int]
        Permutation name → its size (the number of units it permutes).
    axes : dict[str, tuple[str | None, ...]]
        Tensor name → one entry per axis: the permutation acting on it, or ``None``.
    source : str
        ``"traced"`` or ``"manual"``.
    notes : tuple[str, ...]
        What the tracer left unpermuted and why.
    structure : dict[str, tuple]
        Permutations that are not free, by name (absent: a free permutation):

        * ``("heads", group, H, d, within)``: an axis of H·d features read as H attention
          heads of d features (unit ``h·d + j``). The heads move as wholes under the head
          permutation ``group`` (shared by every permutation naming it: Q and K's
          query/key features and V's and the output projection's value features of one
          attention layer), ``None`` when the heads stay in place; with ``within`` true
          each head's d features are permuted too (one permutation per head), else not.
        * ``("grouped", group, G, r, d, base, rho)``: an axis of G·r·d features read as the
          query heads of grouped-query attention: G key/value groups of r query heads of d
          features (unit ``(g·r + i)·d + j``; query head g·r + i reads key/value head g).
          The groups move as wholes under the head permutation ``group`` (the one of the
          key/value heads; ``None``: in place); within each group its r query heads are
          permuted by ``rho`` (one permutation of r per group; ``None``: in place); the d
          features of every query head of group g follow the within-head permutation of
          head g of the "heads" permutation ``base`` (the key heads for Q, the value heads
          for the output projection; ``None`` or a base without ``within``: in place).
          With G = 1 (multi-query attention: one key/value head read by all r query
          heads) ``base`` is ``("heads", group, 1, d, True)`` on the K (V) projection's d
          outputs: one feature order, shared by K's (V's) outputs and every query head's
          block, and ``rho`` orders the r query heads.
        * ``("cat", parts, sizes)``: an axis made of consecutive segments (a fused QKV
          projection); segment j has ``sizes[j]`` units under permutation ``parts[j]``
          (``None``: unpermuted). A permutation may be a segment of several axes.

        Every permutation in ``perms`` is applied as one flat reordering of its axis
        (:func:`expand_permutations` builds the flat ones from heads and segments).
    """

    perms: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    source: str = "manual"
    notes: tuple[str, ...] = field(default_factory=tuple)
    structure: dict[str, tuple] = field(default_factory=dict)

    def perm_to_axes(self, names: Sequence[str] | None = None) -> dict[str, list[tuple[str, int]]]:
        """Permutation → the (tensor, axis) pairs it acts on (optionally only ``names``)."""
        keep = None if names is None else set(names)
        out: dict[str, list[tuple[str, int]]] = {p: [] for p in self.perms}
        for name, axes in self.axes.items():
            if keep is not None and name not in keep:
                continue
            for axis, perm in enumerate(axes):
                if perm is not None:
                    out[perm].append((name, axis))
        return out

    def to_dict(self) -> dict:
        return {"perms": dict(self.perms),
                "axes": {k: list(v) for k, v in self.axes.items()},
                "source": self.source, "notes": list(self.notes),
                "structure": {k: [list(x) if isinstance(x, tuple) else x for x in v]
                              for k, v in self.structure.items()}}

    @property
    def head_groups(self) -> dict[str, int]:
        """Head permutation name → number of heads (of key/value groups with grouped-query
        attention)."""
        return {entry[1]: int(entry[2]) for entry in self.structure.values()
                if entry[0] in ("heads", "grouped") and entry[1] is not None}

    @property
    def query_groups(self) -> dict[str, tuple[int, int]]:
        """Within-group query-head permutation name (grouped-query attention) → (G, r):
        one permutation of r query heads for each of the G groups."""
        return {entry[6]: (int(entry[2]), int(entry[3])) for entry in self.structure.values()
                if entry[0] == "grouped" and entry[6] is not None}

    @property
    def free(self) -> list[str]:
        """Permutations with no structure (each one solved as one assignment)."""
        return [p for p in self.perms if p not in self.structure]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}:{v}" for k, v in self.perms.items())
        return f"PermutationSpec({len(self.perms)} permutations [{sizes}], {len(self.axes)} tensors)"


# ----------------------------------------------------------------------------- validation
def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        state = {k: v.detach() for k, v in model_or_state.named_parameters()}
        state.update({k: v.detach() for k, v in model_or_state.named_buffers()})
        return state
    return dict(model_or_state)


def coerce_spec(spec: PermutationSpec | Mapping[str, Sequence[str | None]],
                model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> PermutationSpec:
    """Check a spec (or a plain ``{name: axes}`` dict) against a model's tensors.

    Every parameter and floating-point buffer must be listed with one entry per axis, and
    all axes under one permutation must have the same size. Integer buffers (such as
    BatchNorm's ``num_batches_tracked``) may be left out.
    """
    state = _state(model_or_state)
    raw = spec.axes if isinstance(spec, PermutationSpec) else spec
    if not isinstance(raw, Mapping):
        raise ConfigError(f"spec must be a PermutationSpec or a dict, got {type(spec).__name__}. "
                          + SPEC_HELP)
    unknown = [k for k in raw if k not in state]
    if unknown:
        raise ConfigError(f"the spec names tensors the model does not have: {unknown[:6]}. "
                          f"The model's tensors are {list(state)[:12]}{' …' if len(state) > 12 else ''}.")
    missing = [k for k, v in state.items() if k not in raw and (v.is_floating_point() or v.dim() > 0)]
    if missing:
        raise ConfigError(f"the spec does not cover {len(missing)} tensor(s) of the model: "
                          f"{missing[:8]}{' …' if len(missing) > 8 else ''}. " + SPEC_HELP)
    axes: dict[str, tuple[str | None, ...]] = {}
    sizes: dict[str, int] = {}
    for name, tensor in state.items():
        entry = tuple(raw.get(name, (None,) * tensor.dim()))
        if len(entry) != tensor.dim():
            raise ConfigError(f"spec entry for '{name}' has {len(entry)} axes but the tensor has "
                              f"shape {tuple(tensor.shape)} ({tensor.dim()} axes); give one "
                              "permutation name or None per axis.")
        for axis, perm in enumerate(entry):
            if perm is None:
                continue
            size = int(tensor.shape[axis])
            if sizes.setdefault(str(perm), size) != size:
                raise ConfigError(f"permutation '{perm}' acts on axes of different sizes: "
                                  f"{sizes[str(perm)]} elsewhere but {size} on axis {axis} of "
                                  f"'{name}' {tuple(tensor.shape)}.")
        axes[name] = tuple(None if p is None else str(p) for p in entry)
    if isinstance(spec, PermutationSpec):
        kept = {p: sizes.get(p, n) for p, n in spec.perms.items()
                if p in sizes or _referenced(spec.structure, p)}
        _check_structure(spec.structure, kept)
        return PermutationSpec(kept, axes, spec.source, spec.notes, dict(spec.structure))
    return PermutationSpec(sizes, axes, "manual")


def _referenced(structure: Mapping[str, tuple], name: str) -> bool:
    return name in structure or any((e[0] == "cat" and name in e[1])
                                    or (e[0] == "grouped" and e[5] == name)
                                    for e in structure.values())


def _structured_size(entry: tuple) -> int:
    if entry[0] == "heads":
        return int(entry[2]) * int(entry[3])
    if entry[0] == "grouped":
        return int(entry[2]) * int(entry[3]) * int(entry[4])
    return int(sum(entry[2]))


def _check_structure(structure: Mapping[str, tuple], sizes: Mapping[str, int]) -> None:
    for name, entry in structure.items():
        if entry[0] not in ("heads", "cat", "grouped") or len(entry) != {
                "heads": 5, "cat": 3, "grouped": 7}[entry[0]]:
            raise ConfigError(f"structure of '{name}' must be ('heads', group, H, d, within), "
                              "('grouped', group, G, r, d, base, rho) or ('cat', parts, "
                              f"sizes); got {entry!r}.")
        if entry[0] == "grouped" and entry[5] is not None:
            base = structure.get(entry[5])
            if (base is None or base[0] != "heads" or base[1] != entry[1]
                    or (int(base[2]), int(base[3])) != (int(entry[2]), int(entry[4]))):
                raise ConfigError(
                    f"grouped-query permutation '{name}' {entry!r} shares the features of "
                    f"'{entry[5]}', which must be a ('heads', {entry[1]!r}, {entry[2]}, "
                    f"{entry[4]}, within) permutation (its key/value heads); got {base!r}.")
        if name in sizes and sizes[name] != _structured_size(entry):
            raise ConfigError(f"permutation '{name}' acts on axes of {sizes[name]} units but its "
                              f"structure {entry!r} has {_structured_size(entry)}.")
        if entry[0] == "cat":
            for part, size in zip(entry[1], entry[2]):
                if part is not None and sizes.get(part, size) != size:
                    raise ConfigError(f"segment '{part}' of '{name}' has {size} units but "
                                      f"permutes {sizes[part]} elsewhere.")


def expand_permutations(spec: PermutationSpec, free: Mapping[str, torch.Tensor],
                        heads: Mapping[str, torch.Tensor] | None = None,
                        within: Mapping[str, torch.Tensor] | None = None,
                        rho: Mapping[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The flat permutation of every permutation of the spec, from its free parts.

    ``free``: free permutation name → LongTensor; ``heads``: head group → LongTensor σ of
    the H heads; ``within``: ("heads" permutation) name → (H, d) LongTensor τ; ``rho``:
    within-group query-head permutation name → (G, r) LongTensor ρ. Missing entries are
    the identity. A "heads" permutation is ``perm[h·d + j] = σ[h]·d + τ[h, j]`` (head h of
    the result is head σ[h] of the input, its feature j that head's feature τ[h, j]); a
    "grouped" one is ``perm[(g·r + i)·d + j] = (σ[g]·r + ρ[g, i])·d + τ_base[g, j]`` (query
    head i of group g of the result is query head ρ[g, i] of group σ[g] of the input, its
    features ordered as those of key/value head g); a "cat" permutation is its segments'
    permutations, offset, end to end.
    """
    heads, within, rho = dict(heads or {}), dict(within or {}), dict(rho or {})
    out: dict[str, torch.Tensor] = {}

    def flat(name: str | None, size: int) -> torch.Tensor:
        if name is None:
            return torch.arange(size)
        if name in out:
            return out[name]
        entry = spec.structure.get(name)
        if entry is None:
            value = torch.as_tensor(free[name]).long() if name in free else torch.arange(size)
        elif entry[0] == "heads":
            _, group, h, d, has_within = entry
            sigma = (torch.as_tensor(heads[group]).long() if group is not None and group in heads
                     else torch.arange(h))
            tau = (torch.as_tensor(within[name]).long().reshape(h, d)
                   if has_within and name in within else torch.arange(d).expand(h, d))
            value = (sigma[:, None] * d + tau).reshape(-1)
        elif entry[0] == "grouped":
            _, group, g, r, d, base, rho_name = entry
            sigma = (torch.as_tensor(heads[group]).long() if group is not None and group in heads
                     else torch.arange(g))
            inner = (torch.as_tensor(rho[rho_name]).long().reshape(g, r)
                     if rho_name is not None and rho_name in rho
                     else torch.arange(r).expand(g, r))
            base_entry = spec.structure.get(base) if base is not None else None
            tau = (torch.as_tensor(within[base]).long().reshape(g, d)
                   if base_entry is not None and base_entry[4] and base in within
                   else torch.arange(d).expand(g, d))
            heads_of = sigma[:, None] * r + inner  # (G, r): the input query head of each
            value = (heads_of[:, :, None] * d + tau[:, None, :]).reshape(-1)
        else:
            pieces, offset = [], 0
            for part, part_size in zip(entry[1], entry[2]):
                pieces.append(flat(part, int(part_size)) + offset)
                offset += int(part_size)
            value = torch.cat(pieces)
        out[name] = value
        return value

    for name, size in spec.perms.items():
        flat(name, size)
    return out


def apply_permutations(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: Mapping[str, torch.Tensor], *, except_axis: tuple[str, int] | None = None
                       ) -> dict[str, torch.Tensor]:
    """π(θ): index every axis of every tensor by its permutation, ``θ[..., perm, ...]``.

    A permutation ``perm`` (a LongTensor) makes unit ``i`` of the result unit ``perm[i]`` of
    the input. ``except_axis=(name, axis)`` leaves that one axis of that tensor unpermuted.
    """
    out = {}
    for name, tensor in state.items():
        for axis, perm in enumerate(spec.axes.get(name, ())):
            if perm is None or (except_axis is not None and except_axis == (name, axis)):
                continue
            tensor = tensor.index_select(axis, perms[perm].to(tensor.device))
        out[name] = tensor
    return out


# ----------------------------------------------------------------------------- tracing
class _UnionFind:
    """Variables for tensor axes; variable 0 is FIXED (the identity permutation).

    A class may carry a structure: ``("prod", (outer, inner), (n_outer, n_inner))`` for an
    axis that a reshape splits into two (unit ``o·n_inner + i`` is unit ``i`` of block
    ``o``, e.g. heads × head dimension), or ``("cat", parts, sizes)`` for an axis that a
    split/chunk cuts into consecutive segments (a fused QKV projection). Unifying two
    structured classes unifies their parts; structures that disagree fix both.
    """

    FIXED = 0

    def __init__(self) -> None:
        self.parent = [0]
        self.struct: dict[int, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        work = [(a, b)]
        while work:
            a, b = work.pop()
            ra, rb = self.find(a), self.find(b)
            if ra == rb:
                continue
            if rb == self.FIXED:
                ra, rb = rb, ra
            self.parent[rb] = ra  # FIXED, when involved, stays the root
            sa, sb = self.struct.pop(ra, None), self.struct.pop(rb, None)
            if ra == self.FIXED:  # a fixed axis fixes every part of its structure
                work.extend((v, self.FIXED) for s in (sa, sb) if s for v in s[1])
            elif sa is not None and sb is not None:
                if sa[0] == sb[0] and sa[2] == sb[2]:
                    self.struct[ra] = sa
                    work.extend(zip(sa[1], sb[1]))
                else:  # two incompatible structures on one axis: leave it all unpermuted
                    work.append((ra, self.FIXED))
                    work.extend((v, self.FIXED) for v in (*sa[1], *sb[1]))
            elif sa is not None or sb is not None:
                self.struct[ra] = sa if sa is not None else sb

    def fix(self, a: int) -> None:
        self.union(a, self.FIXED)

    def structure(self, a: int, kind: str, parts: Sequence[int], sizes: Sequence[int]) -> None:
        """Declare that axis class ``a`` is made of ``parts`` (see the class docstring)."""
        root = self.find(a)
        if root == self.FIXED:
            for v in parts:
                self.fix(v)
            return
        helper = self.new()
        self.struct[helper] = (kind, tuple(parts), tuple(int(s) for s in sizes))
        self.union(root, helper)

    def root_struct(self, a: int) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
        return self.struct.get(self.find(a))


_UNARY = {
    "relu", "relu_", "tanh", "sigmoid", "erf", "gelu", "silu", "elu", "leaky_relu", "softplus",
    "hardtanh", "hardswish", "hardsigmoid", "mish", "celu", "selu", "threshold", "log_sigmoid",
    "abs", "neg", "exp", "log", "sqrt", "rsqrt", "clone", "detach", "alias", "_to_copy",
    "clamp", "clamp_min", "clamp_max", "sign", "square", "reciprocal", "lift_fresh_copy",
    "dropout", "sin", "cos", "contiguous", "expm1", "log1p", "logit", "hardshrink",
    "softshrink", "_softmax", "_log_softmax", "softmax", "log_softmax", "bernoulli",
    "silu_", "tanh_", "sigmoid_", "gelu_", "erf_",
}
#: elementwise nonlinearities: their outputs are the "activations" that activation matching
#: correlates (Ainsworth et al. 2023, §3.1)
ACTIVATIONS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "erf", "erf_", "gelu",
               "gelu_", "silu", "silu_", "elu", "leaky_relu", "softplus", "hardtanh", "hardswish",
               "hardsigmoid", "mish", "celu", "selu", "threshold", "log_sigmoid"}
_BROADCAST = {"add", "sub", "mul", "div", "maximum", "minimum", "where", "rsub", "fmod",
              "remainder", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
              "addcmul", "addcdiv", "lerp", "pow", "masked_fill", "expand", "expand_as",
              "copy", "fill", "zeros_like", "ones_like", "full_like", "empty_like", "add_",
              "mul_", "sub_", "div_", "copy_", "clamp_min_"}
_CONSTANTS = {"empty", "zeros", "ones", "full", "scalar_tensor", "empty_strided", "new_zeros",
              "new_ones", "new_full", "new_empty"}
_RESHAPE = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "flatten",
            "_reshape_alias", "unflatten"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp", "prod", "var_mean",
           "std_mean", "max", "min", "norm", "linalg_vector_norm"}
_ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
              "_scaled_dot_product_fused_attention_overrideable",
              "_scaled_dot_product_attention_math_for_mps", "_native_multi_head_attention"}
#: ops on integer/boolean data (ids, positions, masks; float too for those whose result is
#: an index or a mask): they touch no hidden unit
_INDEX_ONLY = {"argmax", "argmin", "argsort", "sort", "topk", "cumsum", "nonzero", "bitwise_and",
               "bitwise_or", "bitwise_not", "bitwise_xor", "logical_not", "logical_xor", "any",
               "all", "isinf", "isnan", "isfinite", "tril", "triu", "searchsorted",
               "bucketize", "_unsafe_index", "diff", "vmap_tril", "__and__", "__or__"}
_INDEX_RESULT = {"argmax", "argmin", "argsort", "isinf", "isnan", "isfinite"}
#: ops that gather along axes: understood only on integer data (ids, positions)
_INDEXING = {"gather", "index", "index_select", "take", "take_along_dim", "scatter",
             "index_put", "index_put_", "masked_select"}
_IGNORE = {"sym_size", "sym_numel", "sym_stride", "_assert_async", "_assert_scalar",
           "sym_constrain_range_for_size", "_local_scalar_dense"}


def _is_float(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())


def _op_name(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]
                    ) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes of ``src`` and ``dst`` (size-1 axes dropped) with equal products."""
    a = [i for i, s in enumerate(src) if s != 1]
    b = [i for i, s in enumerate(dst) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= src[a[i]]
                ga.append(a[i])
                i += 1
            elif pb < pa and j < len(b):
                pb *= dst[b[j]]
                gb.append(b[j])
                j += 1
            else:
                return None
        groups.append((ga, gb))
    if i != len(a) or j != len(b):
        return None
    return groups


def _atoms(src: list[int], dst: list[int]) -> list[int] | None:
    """The common refinement of two factorisations of one size into consecutive factors
    (e.g. [N, H·d] and [N·H, d] → [N, H, d]); None when the cuts do not nest."""
    cuts = set()
    for sizes in (src, dst):
        product = 1
        for size in sizes:
            product *= size
            cuts.add(product)
    atoms, last = [], 1
    for cut in sorted(cuts):
        if cut % last:
            return None
        atoms.append(cut // last)
        last = cut
    for sizes in (src, dst):  # every axis must be a run of whole atoms
        product = 1
        for size in sizes:
            product *= size
            if product not in cuts:
                return None
    return atoms


class _Tracer:
    """Walks a make_fx graph and assigns union-find variables to every tensor axis."""

    def __init__(self, graph_module: Any, names: list[str]) -> None:
        self.gm = graph_module
        self.uf = _UnionFind()
        self.vars: dict[Any, Any] = {}
        self.names = names
        self.notes: list[str] = []
        #: outer part of a reshape split → (split axis, outer, inner, sizes)
        self.outer_of: dict[int, tuple[int, int, int, tuple[int, int]]] = {}
        #: split axis → (outer, inner, sizes, {block index: segment variable})
        self.selected: dict[int, tuple[int, int, tuple[int, int], dict[int, int]]] = {}
        #: head dimensions permuted by one order shared by every head (multi-query
        #: attention: the key/value head's features, read by every query head)
        self.shared: set[int] = set()

    # -- helpers
    def fresh(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.uf.new() for _ in shape)

    def fixed(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.uf.FIXED for _ in shape)

    def of(self, arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, torch.fx.Node):
            value = self.vars.get(arg)
            return value if isinstance(value, tuple) else None
        return None

    def fix_all(self, value: Any) -> None:
        if isinstance(value, torch.fx.Node):
            value = self.vars.get(value)
        if isinstance(value, tuple):
            for v in value:
                self.uf.fix(v)
        elif isinstance(value, list):
            for item in value:
                self.fix_all(item)

    def tensor_args(self, node: Any) -> list[Any]:
        flat = []

        def visit(a: Any) -> None:
            if isinstance(a, torch.fx.Node):
                flat.append(a)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return [a for a in flat if self.of(a) is not None]

    def unify(self, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        for x, y in zip(a, b):
            self.uf.union(x, y)

    # -- the walk
    def run(self) -> None:
        placeholders = 0
        for node in self.gm.graph.nodes:
            shape = _shape(node)
            if node.op == "placeholder":
                if placeholders < len(self.names):
                    self.vars[node] = self.fresh(shape or ())
                else:  # the model's input: data is never permuted
                    self.vars[node] = self.fixed(shape or ())
                placeholders += 1
            elif node.op == "output":
                for arg in self.tensor_args(node):
                    self.fix_all(arg)
            elif node.op == "call_function":
                self.vars[node] = self.call(node, shape)
            elif node.op == "get_attr":
                value = getattr(self.gm, node.target)
                self.vars[node] = (self.fixed(tuple(value.shape)) if isinstance(value, torch.Tensor)
                                   else None)
            else:
                raise UnsupportedOperationError(
                    f"cannot analyse graph node {node.format_node()} ({node.op}). " + SPEC_HELP)

    def finish(self) -> None:
        """Settle the structured axes (heads, fused projections) conservatively.

        A ("prod", (heads, dims)) axis keeps its head permutation only when the head axis
        appears on no parameter by itself, and its within-head permutation (one per head)
        only when the head dimension appears on no parameter by itself and every value
        carrying it also carries the head axis (so each head's dimensions may move on
        their own); otherwise that part is fixed. Where the head dimension cannot move head
        by head only because it sits on a parameter or a value without the head axis (the
        one key/value head of multi-query attention, whether SDPA's ``enable_gqa`` or an
        expand repeats it) it moves with one order shared by every head (``self.shared``).
        Fixed parts never break the function."""
        uf, fixed = self.uf, self.uf.FIXED
        params = [n for n in self.gm.graph.nodes if n.op == "placeholder"][:len(self.names)]
        # a (k·E) axis reshaped to (k, E) whose k blocks are each selected (MHA's packed
        # in-projection): the blocks are segments, each with its own permutation
        for root, (outer, inner, sizes, chosen) in self.selected.items():
            if (len(chosen) == sizes[0] and uf.find(root) != fixed and uf.root_struct(root)
                    and uf.root_struct(root)[0] == "prod"
                    and [uf.find(v) for v in uf.root_struct(root)[1]] == [uf.find(outer),
                                                                          uf.find(inner)]):
                uf.struct[uf.find(root)] = ("cat", tuple(chosen[j] for j in range(sizes[0])),
                                            (sizes[1],) * sizes[0])
                uf.fix(outer)
            else:
                for v in chosen.values():
                    uf.fix(v)
        changed = True
        while changed:
            changed = False
            groups: dict[tuple, int] = {}
            for root, (kind, parts, sizes) in list(uf.struct.items()):
                if uf.find(root) != root or root == fixed:
                    continue  # one structure, one permutation: merge duplicates
                key = (kind, tuple(uf.find(v) for v in parts), sizes)
                if key in groups and uf.find(groups[key]) != root:
                    uf.union(groups[key], root)
                    changed = True
                groups.setdefault(key, root)
            exposed = {uf.find(v) for node in params for v in self.vars.get(node, ())}

            def closure(roots: set[int]) -> set[int]:
                todo = list(roots)
                while todo:
                    entry = uf.struct.get(todo.pop())
                    for part in entry[1] if entry else ():
                        if uf.find(part) not in roots:
                            roots.add(uf.find(part))
                            todo.append(uf.find(part))
                return roots

            relevant = closure(set(exposed))
            values = []
            for value in self.vars.values():
                for item in (value if isinstance(value, list) else [value]):
                    if isinstance(item, tuple):
                        values.append(closure({uf.find(v) for v in item}))
            for root, (kind, parts, _sizes) in list(uf.struct.items()):
                if uf.find(root) != root or root == fixed or root not in relevant:
                    continue
                found = [uf.find(v) for v in parts]
                if kind == "cat":
                    if all(r == fixed for r in found):
                        uf.fix(root)
                        changed = True
                    continue
                outer, inner = found
                grouped = self._grouped(outer)
                for part, label in ((outer, "head"), (inner, "within-head")):
                    if label == "within-head" and (part in self.shared or (
                            part in exposed and self._share(outer, part))):
                        continue  # on a parameter by itself: one order for every head
                    if part != fixed and (part in exposed or (
                            part in uf.struct and not (label == "head" and grouped))):
                        uf.fix(part)
                        changed = True
                        self.notes.append(f"the {label} axis of a split of {_sizes} features "
                                          "also appears on its own (on a parameter, or split "
                                          "again): it is left unpermuted; pass spec= by hand "
                                          "to permute it")
                outer, inner = uf.find(outer), uf.find(inner)
                if inner in self.shared:
                    continue
                # the features within a head move head by head; the query heads of grouped-
                # query attention (G groups × r heads) move theirs group by group, as the
                # key/value head of their group (one more "prod" (G, these features) class)
                grouped = self._grouped(outer)
                cond = grouped[0] if grouped else outer
                if inner != fixed and grouped and not any(
                        uf.find(r) == r and e[0] == "prod"
                        and [uf.find(v) for v in e[1]] == [cond, inner]
                        for r, e in uf.struct.items()):
                    if self._share(outer, inner):
                        continue
                    uf.fix(inner)
                    changed = True
                    self.notes.append(f"the query heads of a split of {_sizes} features read "
                                      "grouped key/value heads that are not split from one "
                                      "axis: the features within the heads are left in place")
                if inner != fixed and (cond == fixed or any(
                        inner in roots and cond not in roots for roots in values)):
                    if self._share(outer, inner):
                        continue
                    uf.fix(inner)  # the dims cannot move head by head: left unpermuted
                    changed = True
                if outer == fixed and uf.find(inner) == fixed:
                    uf.fix(root)
                    changed = True
            changed = self._settle_shared() or changed

    def _share(self, outer: int, inner: int) -> bool:
        """Mark the head dimension ``inner`` of the heads ``outer`` as permuted by one order
        shared by every head (it cannot move head by head: it sits on a parameter by itself
        or on a value without the head axis, as the features of the one key/value head of
        multi-query attention do); False when it cannot be (it is split further, the heads
        are fixed, or they are G > 1 groups of query heads)."""
        uf = self.uf
        outer, inner = uf.find(outer), uf.find(inner)
        if inner == uf.FIXED or outer == uf.FIXED or inner in uf.struct:
            return False
        grouped = self._grouped(outer)
        if grouped is not None and int(uf.struct[outer][2][0]) != 1:
            return False
        self.shared.add(inner)
        return True

    def _settle_shared(self) -> bool:
        """Every head axis with a shared head dimension has only shared (or fixed) ones:
        its heads are then one group whose features all move with one order each."""
        uf, fixed, changed = self.uf, self.uf.FIXED, False
        while True:
            self.shared = {uf.find(v) for v in self.shared if uf.find(v) != fixed}
            prods = [tuple(uf.find(v) for v in e[1]) for r, e in uf.struct.items()
                     if uf.find(r) == r and r != fixed and e[0] == "prod"]
            outers = {o for o, i in prods if i in self.shared}
            todo = [(o, i) for o, i in prods if i != fixed and i not in self.shared
                    and o in outers]
            bad = [i for o, i in prods if i in self.shared and (o == fixed or (
                self._grouped(o) is not None and int(uf.struct[o][2][0]) != 1))]
            if not todo and not bad:
                return changed
            for i in bad:
                self.shared.discard(i)
                uf.fix(i)
            for o, i in todo:
                if not self._share(o, i):
                    uf.fix(i)
            changed = True

    def _grouped(self, outer: int) -> tuple[int, int] | None:
        """(G, r) roots when the head axis ``outer`` is itself G groups × r heads with
        unstructured parts (the query heads of grouped-query attention), else None."""
        uf = self.uf
        entry = uf.struct.get(uf.find(outer)) if uf.find(outer) != uf.FIXED else None
        if entry is None or entry[0] != "prod":
            return None
        g, r = (uf.find(v) for v in entry[1])
        if g in uf.struct or r in uf.struct:
            return None
        return g, r

    def call(self, node: Any, shape: tuple[int, ...] | None) -> Any:
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            value = self.vars.get(source)
            if isinstance(value, list):
                return value[index]
            if isinstance(value, tuple):  # indexing a tensor: conservative
                self.fix_all(value)
                return self.fixed(shape) if shape is not None else None
            return None
        name = _op_name(target)
        args = node.args
        if name in _IGNORE:
            return None
        if shape is None and not isinstance(node.meta.get("val"), (tuple, list)):
            return None  # a non-tensor result (sizes, scalars)
        x = self.of(args[0]) if args else None
        if name in _CONSTANTS:
            return self.fresh(shape)  # uniform constants: permuting them changes nothing
        if name in ("arange", "randn", "rand", "randint", "linspace", "eye", "tensor"):
            return self.fixed(shape)
        if name in _UNARY and name not in _BROADCAST and x is not None and len(x) == len(shape):
            return x
        if name in _BROADCAST or name in _UNARY:
            return self.broadcast(node, shape)
        if name in ("t", "transpose", "permute", "numpy_T", "swapaxes"):
            return self.reorder(name, node, x)
        if name in _RESHAPE:
            return self.reshape(x, _shape(args[0]), shape)
        if name in ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear"):
            return self.matmul(name, node, shape)
        if name == "convolution":
            return self.convolution(node, shape)
        if name in ("native_batch_norm", "_native_batch_norm_legit_no_training",
                    "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                    "batch_norm", "instance_norm"):
            return self.channel_norm(node, x, shape, channel=1)
        if name == "native_layer_norm":
            return self.layer_norm(node, x)
        if name == "native_group_norm":
            return self.group_norm(node, x)
        if name in _REDUCE:
            return self.reduce(node, x, shape)
        if "pool" in name:
            return self.pool(name, node, x, shape)
        if name in ("cat", "concat", "stack"):
            return self.concat(name, node, shape)
        if name == "embedding":
            weight, indices = self.of(args[0]), self.of(args[1])
            if indices is not None:
                self.fix_all(indices)
            if weight is not None:
                self.uf.fix(weight[0])  # token ids are data
                return self.fixed(shape[:-1]) + (weight[1],)
        if name in ("slice", "select", "narrow"):
            return self.slicing(name, node, x, shape)
        if name in ("split", "split_with_sizes", "chunk", "unsafe_split",
                    "unsafe_split_with_sizes", "tensor_split"):
            return self.split(node, x)
        if name == "unbind":
            return self.unbind(node, x)
        if name in _ATTENTION:
            return self.attention(name, node)
        if ((name in _INDEX_ONLY and (not _is_float(args[0]) or name in _INDEX_RESULT))
                or (name in _INDEXING and (name != "index_select" or not _is_float(args[0])))):
            # ops that only index (ids of tokens and positions, masks, caches) touch no
            # hidden unit
            for arg in self.tensor_args(node):
                self.fix_all(arg)
            return self.fixed(shape) if shape is not None else self._fixed_outputs(node)
        if name == "index_select" and x is not None:
            dim = int(args[1]) % len(x)
            self.uf.fix(x[dim])
            self.fix_all(args[2])
            return tuple(self.uf.FIXED if a == dim else v for a, v in enumerate(x))
        if name in ("rms_norm", "_fused_rms_norm") and x is not None:
            weight = self.of(args[2]) if len(args) > 2 else None
            if weight is not None:
                for axis, v in enumerate(weight):
                    self.uf.union(v, x[len(x) - len(weight) + axis])
            return self._norm_outputs(node, x)
        if name == "prelu":
            weight = self.of(args[1])
            if weight is not None and len(weight) == 1 and _shape(args[1])[0] > 1 and x is not None:
                self.uf.union(weight[0], x[1])
            return x
        raise UnsupportedOperationError(
            f"permutation_spec cannot analyse the operation aten.{name} (graph node "
            f"'{node.name}'); it does not know how hidden units flow through it. " + SPEC_HELP)

    def _fixed_outputs(self, node: Any) -> Any:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return [self.fixed(tuple(v.shape)) if isinstance(v, torch.Tensor) else None
                    for v in val]
        return None

    def split(self, node: Any, x: tuple[int, ...] | None) -> Any:
        """split/chunk of one axis into consecutive segments: the axis carries a ("cat", …)
        structure whose parts are the segments' axes (a fused QKV projection)."""
        val = node.meta.get("val")
        if x is None or not isinstance(val, (tuple, list)):
            return None
        name = _op_name(node.target)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if name == "tensor_split":
            self.fix_all(x)
            return [self.fixed(tuple(v.shape)) for v in val]
        dim = int(dim) % len(x)
        sizes = [int(v.shape[dim]) for v in val]
        parts = [self.uf.new() for _ in val]
        self.uf.structure(x[dim], "cat", parts, sizes)
        return [tuple(parts[i] if a == dim else v for a, v in enumerate(x))
                for i in range(len(val))]

    def unbind(self, node: Any, x: tuple[int, ...] | None) -> Any:
        val = node.meta.get("val")
        if x is None or not isinstance(val, (tuple, list)):
            return None
        dim = int(node.args[1]) % len(x) if len(node.args) > 1 else 0
        self.uf.fix(x[dim])
        return [tuple(v for a, v in enumerate(x) if a != dim) for _ in val]

    def attention(self, name: str, node: Any) -> Any:
        """softmax(Q Kᵀ/√d + mask) V over (…, heads, positions, dims) operands, any backend:
        batch and head axes of Q, K, V and the output are tied, Q's and K's last axes are
        contracted (tied), K's and V's positions are tied, V's last axis is the output's.
        With G K/V heads and G·r Q heads (grouped-query attention, ``enable_gqa=True``:
        query head g·r + i reads key/value head g) Q's head axis is G groups × r heads,
        the groups tied to the K/V heads."""
        if name == "_native_multi_head_attention":
            return self.native_mha(node)
        q, k, v = (self.of(a) for a in node.args[:3])
        sq, sk, sv = (_shape(a) for a in node.args[:3])
        val = node.meta.get("val")
        out_shape = tuple((val[0] if isinstance(val, (tuple, list)) else val).shape)
        if q is None or k is None or v is None:
            for a in node.args[:3]:
                self.fix_all(a)
            out = self.fixed(out_shape)
        else:
            lead = len(sq) - 2
            for axis in range(lead):
                if sq[axis] == sk[axis] == sv[axis]:
                    self.uf.union(q[axis], k[axis])
                    self.uf.union(k[axis], v[axis])
                elif (axis == lead - 1 and sk[axis] == sv[axis] and 0 < sk[axis] < sq[axis]
                      and sq[axis] % sk[axis] == 0):  # grouped-query: G groups × r heads
                    self.uf.union(k[axis], v[axis])
                    self.uf.structure(q[axis], "prod", (k[axis], self.uf.new()),
                                      (sk[axis], sq[axis] // sk[axis]))
                else:  # broadcasting over heads
                    for t in (q, k, v):
                        self.uf.fix(t[axis])
                    self.notes.append(f"attention '{node.name}' has {sq[axis]} query but "
                                      f"{sk[axis]} key/value heads (not a multiple): its "
                                      "heads are left unpermuted")
            self.uf.union(q[-1], k[-1])
            self.uf.union(k[-2], v[-2])
            out = tuple(q[:-1]) + (v[-1],)
        for arg in [*node.args[3:], *node.kwargs.values()]:
            if isinstance(arg, torch.fx.Node) and self.of(arg) is not None:
                self.fix_all(arg)  # masks and biases of the scores index positions only
        if isinstance(val, (tuple, list)):
            return [out] + [self.fresh(tuple(t.shape)) if isinstance(t, torch.Tensor) else None
                            for t in val[1:]]
        return out

    def native_mha(self, node: Any) -> Any:
        """torch._native_multi_head_attention (nn.MultiheadAttention's fast path): a fused
        (3E, E) in-projection, heads of E/H features, an (E, E) out-projection."""
        args = node.args
        query, key, value = (self.of(a) for a in args[:3])
        embed, heads = int(args[3]), int(args[4])
        w_in, b_in, w_out, b_out = (self.of(a) for a in args[5:9])
        d = embed // heads
        head, qk, vo = self.uf.new(), self.uf.new(), self.uf.new()
        qk_flat, vo_flat = self.uf.new(), self.uf.new()
        self.uf.structure(qk_flat, "prod", (head, qk), (heads, d))
        self.uf.structure(vo_flat, "prod", (head, vo), (heads, d))
        self.uf.structure(w_in[0], "cat", (qk_flat, qk_flat, vo_flat), (embed,) * 3)
        if b_in is not None:
            self.uf.union(b_in[0], w_in[0])
        if not (args[0] is args[1] is args[2]):
            for t in (key, value):
                if t is not None:
                    self.fix_all(t)
        self.uf.union(query[-1], w_in[1])
        self.uf.union(w_out[1], vo_flat)
        if b_out is not None:
            self.uf.union(b_out[0], w_out[0])
        for arg in args[9:]:
            if isinstance(arg, torch.fx.Node) and self.of(arg) is not None:
                self.fix_all(arg)
        out = tuple(query[:-1]) + (w_out[0],)
        val = node.meta.get("val")
        return [out] + [self.fresh(tuple(t.shape)) if isinstance(t, torch.Tensor) else None
                        for t in val[1:]]

    def broadcast(self, node: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Elementwise ops with broadcasting: equal-size aligned axes are tied together."""
        out = list(self.fresh(shape))
        for arg in self.tensor_args(node):
            value, arg_shape = self.of(arg), _shape(arg)
            if arg_shape is None or value is None:
                continue
            offset = len(shape) - len(arg_shape)
            if offset < 0:  # e.g. expand with fewer dims than the input: be conservative
                self.fix_all(value)
                continue
            for axis, size in enumerate(arg_shape):
                if size == shape[offset + axis]:
                    self.uf.union(value[axis], out[offset + axis])
        return tuple(out)

    def reorder(self, name: str, node: Any, x: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if x is None:
            return None
        if name in ("t", "numpy_T"):
            return tuple(reversed(x))
        if name == "permute":
            return tuple(x[d % len(x)] for d in node.args[1])
        d0, d1 = (int(d) % len(x) for d in node.args[1:3])
        out = list(x)
        out[d0], out[d1] = x[d1], x[d0]
        return tuple(out)

    def reshape(self, x: tuple[int, ...] | None, src: tuple[int, ...] | None,
                dst: tuple[int, ...]) -> tuple[int, ...]:
        out = list(self.fresh(dst))
        if x is None or src is None:
            return tuple(out)
        groups = _reshape_groups(src, dst)
        if groups is None:
            self.fix_all(x)
            return self.fixed(dst)
        for ga, gb in groups:
            if len(ga) == 1 and len(gb) == 1:
                out[gb[0]] = x[ga[0]]
                continue
            # axes split or merged: cut both sides into common factors ("atoms"); an axis
            # made of two atoms carries a ("prod", ...) structure, so that e.g. the H·d
            # features of a projection are seen as H heads of d features each
            atoms = _atoms([src[a] for a in ga], [dst[b] for b in gb])
            if atoms is None:
                for a in ga:
                    self.uf.fix(x[a])
                for b in gb:
                    self.uf.fix(out[b])
                continue
            atom_vars = [self.uf.new() for _ in atoms]
            for side, axes, sizes in ((x, ga, src), (out, gb, dst)):
                first = 0
                for axis in axes:
                    count, product = 0, 1
                    while product < sizes[axis]:
                        product *= atoms[first + count]
                        count += 1
                    self.compose(side[axis], atom_vars[first:first + count],
                                 atoms[first:first + count])
                    first += count
        return tuple(out)

    def compose(self, var: int, parts: list[int], sizes: list[int]) -> None:
        """Tie ``var`` to the product of ``parts`` (left-nested for more than two)."""
        if len(parts) == 1:
            self.uf.union(var, parts[0])
            return
        outer, outer_size = parts[0], sizes[0]
        for part, size in zip(parts[1:-1], sizes[1:-1]):
            merged = self.uf.new()
            self.uf.structure(merged, "prod", (outer, part), (outer_size, size))
            outer, outer_size = merged, outer_size * size
        self.uf.structure(var, "prod", (outer, parts[-1]), (outer_size, sizes[-1]))
        self.outer_of[self.uf.find(outer)] = (var, outer, parts[-1], (outer_size, sizes[-1]))

    def matmul(self, name: str, node: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
        args = node.args
        if name == "linear":
            x, w = self.of(args[0]), self.of(args[1])
            bias = self.of(args[2]) if len(args) > 2 else None
            out = (x[:-1] if x else self.fixed(shape[:-1])) + (w[0],)
            if x is not None:
                self.uf.union(x[-1], w[1])
            if bias is not None:
                self.uf.union(bias[0], w[0])
            return out
        if name in ("addmm", "baddbmm"):
            bias, a, b = (self.of(args[i]) for i in range(3))
            bias_shape = _shape(args[0])
        else:
            bias, bias_shape = None, None
            a, b = self.of(args[0]), self.of(args[1])
        if a is None or b is None:
            raise UnsupportedOperationError(f"cannot analyse aten.{name} on non-tensor operands "
                                            f"(node '{node.name}'). " + SPEC_HELP)
        self.uf.union(a[-1], b[-2])
        for u, v in zip(a[:-2], b[:-2]):  # batch axes of bmm
            self.uf.union(u, v)
        out = tuple(a[:-1]) + (b[-1],)
        if bias is not None and bias_shape is not None:
            offset = len(shape) - len(bias_shape)
            for axis, size in enumerate(bias_shape):
                if size == shape[offset + axis]:
                    self.uf.union(bias[axis], out[offset + axis])
        return out

    def convolution(self, node: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
        args = node.args
        x, w = self.of(args[0]), self.of(args[1])
        bias = self.of(args[2]) if len(args) > 2 else None
        transposed = bool(args[6]) if len(args) > 6 else False
        groups = int(args[8]) if len(args) > 8 else 1
        for k in (*w[2:], *x[2:]):
            self.uf.fix(k)  # kernel and input positions are never permuted
        out_axis, in_axis = (w[1], w[0]) if transposed else (w[0], w[1])
        if groups == 1:
            self.uf.union(x[1], in_axis)
        else:
            channels_in = _shape(node.args[0])[1]
            if groups == channels_in and shape[1] == channels_in:  # depthwise
                self.uf.fix(in_axis)
                self.uf.union(x[1], out_axis)
            else:  # grouped: units may only move within a group; left unpermuted
                for v in (x[1], w[0], w[1]):
                    self.uf.fix(v)
        if bias is not None:
            self.uf.union(bias[0], out_axis)
        spatial = self.fixed(shape[2:])
        return (x[0], out_axis) + spatial

    def channel_norm(self, node: Any, x: tuple[int, ...] | None, shape: Any,
                     channel: int) -> Any:
        if x is None:
            raise UnsupportedOperationError(f"cannot analyse node '{node.name}'. " + SPEC_HELP)
        for arg in node.args[1:5]:
            value = self.of(arg)
            if value is not None and len(value) == 1 and _shape(arg)[0] == _shape(node.args[0])[channel]:
                self.uf.union(value[0], x[channel])
        return self._norm_outputs(node, x)

    def _norm_outputs(self, node: Any, x: tuple[int, ...]) -> Any:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            outs = [x]
            for extra in val[1:]:
                extra_shape = tuple(extra.shape) if isinstance(extra, torch.Tensor) else ()
                outs.append(self.fresh(extra_shape))
            return outs
        return x

    def layer_norm(self, node: Any, x: tuple[int, ...]) -> Any:
        normalized = list(node.args[1])
        for arg in node.args[2:4]:
            value = self.of(arg)
            if value is not None:
                offset = len(x) - len(normalized)
                for axis, v in enumerate(value):
                    self.uf.union(v, x[offset + axis])
        return self._norm_outputs(node, x)

    def group_norm(self, node: Any, x: tuple[int, ...]) -> Any:
        channels, groups = int(node.args[4]), int(node.args[6])
        if groups in (1, channels):
            for arg in node.args[1:3]:
                value = self.of(arg)
                if value is not None:
                    self.uf.union(value[0], x[1])
        else:
            self.uf.fix(x[1])
            for arg in node.args[1:3]:
                self.fix_all(arg)
            self.notes.append(f"GroupNorm with {groups} groups of {channels} channels at "
                              f"'{node.name}': its channels are left unpermuted")
        return self._norm_outputs(node, x)

    def reduce(self, node: Any, x: tuple[int, ...] | None, shape: Any) -> Any:
        src = _shape(node.args[0])
        if x is None or src is None:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(len(src)))
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (list, tuple)):
            dims = list(range(len(src)))
        dims = {int(d) % len(src) for d in dims}
        kept = [x[a] for a in range(len(src)) if a not in dims]
        val = node.meta.get("val")
        out_shapes = ([tuple(v.shape) for v in val] if isinstance(val, (tuple, list))
                      else [tuple(val.shape)])
        outs = []
        for out_shape in out_shapes:
            if len(out_shape) == len(kept):
                outs.append(tuple(kept))
            elif len(out_shape) == len(src):  # keepdim
                outs.append(tuple(self.uf.new() if a in dims else x[a] for a in range(len(src))))
            else:
                outs.append(self.fresh(out_shape))
        return outs if isinstance(val, (tuple, list)) else outs[0]

    def pool(self, name: str, node: Any, x: tuple[int, ...] | None, shape: Any) -> Any:
        if x is None:
            return None
        spatial = 3 if "3d" in name else 2 if "2d" in name else 1
        lead = x[:-spatial]
        for v in x[-spatial:]:
            self.uf.fix(v)  # a pooling window mixes positions
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return [lead + self.fixed(tuple(v.shape)[len(lead):]) for v in val]
        return lead + self.fixed(shape[len(lead):])

    def concat(self, name: str, node: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
        tensors = [t for t in node.args[0] if self.of(t) is not None]
        dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
        out = list(self.fresh(shape))
        for t in tensors:
            value = self.of(t)
            if name == "stack":
                d = dim % (len(value) + 1)
                for axis, v in enumerate(value):
                    self.uf.union(v, out[axis if axis < d else axis + 1])
            else:
                d = dim % len(value)
                for axis, v in enumerate(value):
                    if axis == d:
                        self.uf.fix(v)
                    else:
                        self.uf.union(v, out[axis])
        if name != "stack":
            self.uf.fix(out[dim % len(shape)])
        return tuple(out)

    def slicing(self, name: str, node: Any, x: tuple[int, ...] | None, shape: Any) -> Any:
        if x is None:
            return None
        dim = int(node.args[1]) % len(x) if len(node.args) > 1 else 0
        owner = next((o for k, o in self.outer_of.items()
                      if self.uf.find(k) == self.uf.find(x[dim]) != self.uf.FIXED), None)
        if owner is None or name != "select":
            self.uf.fix(x[dim])  # else fixed in finish(), after every block is selected
        if name == "select":
            out = tuple(v for a, v in enumerate(x) if a != dim)
            if owner is not None and isinstance(node.args[2], int):
                root, outer, inner, sizes = owner
                if self.uf.find(inner) in {self.uf.find(v) for v in out}:
                    entry = self.selected.setdefault(root, (outer, inner, sizes, {}))
                    segment = entry[3].setdefault(int(node.args[2]) % sizes[0], self.uf.new())
                    return tuple(segment if self.uf.find(v) == self.uf.find(inner) else v
                                 for v in out)
            return out
        out = list(x)
        out[dim] = self.uf.FIXED
        return tuple(out)


def guess_example_input(model: nn.Module, *, batch: int = 2) -> torch.Tensor:
    """A small input the model accepts, guessed from its first layer (or its recorded
    architecture); raises if it cannot be guessed."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    arch = getattr(model, "ridgeline_architecture", None)
    if isinstance(arch, dict):
        kwargs = arch.get("kwargs", {})
        if arch.get("factory") == "mlp":
            return torch.randn(batch, int(kwargs["in_features"]), dtype=dtype, device=device)
        if arch.get("factory") in ("cnn1d", "resnet"):
            dims, channels = int(kwargs.get("dims", 1)), int(kwargs.get("in_channels", 1))
            size = (32,) if dims == 1 else (16, 16)
            return torch.randn(batch, channels, *size, dtype=dtype, device=device)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return torch.randint(0, module.num_embeddings, (batch, 8), device=device)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {nn.Conv1d: (32,), nn.Conv2d: (32, 32), nn.Conv3d: (8, 8, 8)}[type(module)]
            return torch.randn(batch, module.in_channels, *spatial, dtype=dtype, device=device)
        if hasattr(module, "in_features") and isinstance(module.in_features, int):
            return torch.randn(batch, module.in_features, dtype=dtype, device=device)
    raise UnsupportedOperationError(
        f"cannot guess an input for {type(model).__name__}: pass example_input= (one small batch "
        "the model accepts) or pass spec= by hand. " + SPEC_HELP)


def _trace_modes(model: nn.Module) -> list[tuple[dict[str, Any], str]]:
    """How to call the model while tracing: (keyword arguments, make_fx tracing mode), in
    the order tried.

    A model whose ``forward`` takes ``use_cache`` (Hugging Face's GPT-2, Llama, …) is first
    traced with ``use_cache=False``. In make_fx's default "real" mode that call fails in
    transformers 5: with no cache and no attention mask, ``create_causal_mask`` calls
    ``find_packed_sequence_indices(position_ids)``, which ends in
    ``if not is_tracing(mask) and (mask[:, -1] == 0).all(): return None`` — a Python branch
    on tensor data (``aten._local_scalar_dense``), which make_fx refuses to record; its
    ``is_tracing`` guard sees torch.fx Proxies and FakeTensors but not make_fx's real-mode
    tensors. In "fake" mode the guard sees FakeTensors and takes transformers' own tracing
    path (the packed-sequence mask is computed in the graph, from the position ids only:
    index-only operations), so the call traces, for every input of that shape. Should
    that fail, the model is traced as called (with its default cache, built inside the
    traced call and only indexed); every other model is traced as called, in "real" mode.
    """
    import inspect

    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return ([({"use_cache": False}, "fake")] if takes else []) + [({}, "real")]


def _symbolic_sizes(graph_module: Any) -> str | None:
    """The first graph node whose value has a symbolic (data-dependent) size, if any."""
    for node in graph_module.graph.nodes:
        val = node.meta.get("val")
        for item in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(item, torch.Tensor) and not all(isinstance(s, int) for s in item.shape):
                return node.name
    return None


def trace(model: nn.Module, inputs: torch.Tensor) -> tuple[Any, _Tracer, list[str]]:
    """Record one forward pass as an ATen graph and propagate the axis variables."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ridgeline.objective import module_mode
    from ridgeline.outputs import as_logits
    from ridgeline.params import functional_call

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    names = [*params, *buffers]

    # Hugging Face models that take use_cache are traced with use_cache=False (no cache is
    # built inside the traced call), in make_fx's "fake" mode; see _trace_modes
    graph_module, notes, failure = None, [], None
    modes = _trace_modes(model)

    def calling(kwargs: dict[str, Any]) -> Any:
        def forward(p, b, x):
            return as_logits(functional_call(model, (p, b), (x,), kwargs))
        return forward

    for attempt, (kwargs, mode) in enumerate(modes):
        forward = calling(kwargs)
        last = attempt == len(modes) - 1
        try:
            with module_mode(model, False), torch.no_grad():
                if mode == "fake":  # fake tensors carry no values: check the call for real
                    forward(params, buffers, inputs)
                graph_module = make_fx(forward, tracing_mode=mode)(params, buffers, inputs)
            symbolic = _symbolic_sizes(graph_module)
            if symbolic:  # fake mode records sizes read from the data as symbols
                graph_module = None
                raise RuntimeError(f"the size of '{symbolic}' depends on the input's values")
            break
        except Exception as exc:  # noqa: BLE001 - an earlier way to call it; the last decides
            if last and not isinstance(exc, (RuntimeError, ValueError, TypeError, IndexError,
                                             NotImplementedError)):
                raise
            failure = exc
        if not last:
            notes.append(f"traced as called (use_cache left at its default): the call with "
                         f"{kwargs} failed ({type(failure).__name__}: "
                         f"{str(failure).splitlines()[0][:160] if str(failure) else ''})")
    if graph_module is None:
        exc = failure
        raise UnsupportedOperationError(
            f"tracing {type(model).__name__} on an input of shape {tuple(inputs.shape)} failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Pass example_input= "
            "(a batch the model accepts) or spec= by hand. " + SPEC_HELP) from exc
    tracer = _Tracer(graph_module, names)
    tracer.notes.extend(notes)
    tracer.run()
    tracer.finish()
    return graph_module, tracer, names


def _group_names(tracer: _Tracer, state: dict[str, torch.Tensor], names: list[str],
                 placeholders: list[Any]
                 ) -> tuple[dict[int, str], dict[str, tuple[int, ...]], dict[str, tuple]]:
    """Root variable → a readable permutation name (after the first tensor it permutes),
    and the structure of the structured ones (see :attr:`PermutationSpec.structure`)."""
    uf = tracer.uf
    roots: dict[str, tuple[int, ...]] = {}
    members: dict[int, list[tuple[str, int]]] = {}
    for name, node in zip(names, placeholders):
        axes = tuple(uf.find(v) for v in tracer.vars[node])
        roots[name] = axes
        for axis, root in enumerate(axes):
            if root != uf.FIXED:
                members.setdefault(root, []).append((name, axis))
    labels: dict[int, str] = {}
    used: set[str] = set()

    def fresh_label(base: str) -> str:
        label, k = base, 2
        while label in used:
            label, k = f"{base}#{k}", k + 1
        used.add(label)
        return label

    def label_of(table: dict[int, str], root: int, prefix: str, label: str) -> str:
        """The label of a head or query-head root (one per root, shared by its users)."""
        if root not in table:
            table[root] = fresh_label(prefix + label.removeprefix("P_"))
        return table[root]

    for root, items in members.items():
        sizes = {int(state[n].shape[a]) for n, a in items}
        if (len(items) < 2 and root not in uf.struct) or sizes == {1}:
            continue  # touches one tensor axis only (or size 1): permuting it is pointless
        first = next(((n, a) for n, a in items if a == 0 and state[n].dim() >= 2), items[0])
        labels[root] = fresh_label("P_" + first[0].rsplit(".", 1)[0]
                                   + ("" if first[1] == 0 else f".axis{first[1]}"))
    structure: dict[str, tuple] = {}
    heads: dict[int, str] = {}
    query_heads: dict[int, str] = {}
    single: dict[int, str] = {}  # multi-query attention: its one key/value group
    todo = [r for r in labels if r in uf.struct]
    while todo:
        root = todo.pop(0)
        kind, parts, sizes = uf.struct[root]
        label = labels[root]
        if label in structure:
            continue
        found = [uf.find(v) for v in parts]
        if kind == "cat":
            names_of = []
            for j, part in enumerate(found):
                if part == uf.FIXED:
                    names_of.append(None)
                    continue
                if part not in labels:
                    labels[part] = fresh_label(f"{label}.seg{j}")
                names_of.append(labels[part])
                if part in uf.struct:
                    todo.append(part)
            structure[label] = ("cat", tuple(names_of), tuple(sizes))
        else:
            outer, inner = found
            grouped = tracer._grouped(outer)
            shared = {uf.find(v) for v in tracer.shared}
            if outer != uf.FIXED and (inner in shared or any(
                    e[0] == "prod" and uf.find(r) == r and uf.find(e[1][0]) == outer
                    and uf.find(e[1][1]) in shared for r, e in uf.struct.items())):
                # multi-query attention: the H query heads read one key/value head, whose d
                # features (one order, shared by every query head) sit on K/V by themselves
                r_root = grouped[1] if grouped is not None else outer
                group = label_of(single, outer, "H_", label)
                rho = None
                if r_root != uf.FIXED:
                    rho = label_of(query_heads, r_root, "Q_", label)
                base = None
                if inner in shared:
                    if inner not in labels:  # carried by no parameter by itself
                        labels[inner] = fresh_label(f"{label}.kv")
                    base = labels[inner]
                    structure[base] = ("heads", group, 1, int(sizes[1]), True)
                structure[label] = ("grouped", group, 1, int(sizes[0]), int(sizes[1]), base, rho)
                continue
            if grouped is not None:  # query heads of grouped-query attention
                g_root, r_root = grouped
                g_size = int(uf.struct[outer][2][0])
                group = None
                if g_root != uf.FIXED:
                    group = label_of(heads, g_root, "H_", label)
                rho = None
                if r_root != uf.FIXED:
                    rho = label_of(query_heads, r_root, "Q_", label)
                base = None
                if g_root != uf.FIXED:
                    base_root = next((r for r, e in uf.struct.items()
                                      if uf.find(r) == r and e[0] == "prod"
                                      and [uf.find(v) for v in e[1]] == [g_root, inner]), None)
                    if base_root is not None:
                        if base_root not in labels:  # carried by no parameter by itself
                            labels[base_root] = fresh_label(f"{label}.kv")
                        base = labels[base_root]
                        todo.append(base_root)
                structure[label] = ("grouped", group, g_size, int(sizes[0]) // g_size,
                                    int(sizes[1]), base, rho)
                continue
            group = None
            if outer != uf.FIXED:
                group = label_of(heads, outer, "H_", label)
            structure[label] = ("heads", group, int(sizes[0]), int(sizes[1]),
                                inner != uf.FIXED)
    return labels, roots, structure


def permutation_spec(model: nn.Module, *, example_input: torch.Tensor | None = None
                     ) -> PermutationSpec:
    """Derive the permutation spec of a model automatically (torch.fx tracing).

    Works for MLPs (any activation, BatchNorm or LayerNorm, NTK-parameterised layers), CNNs
    (1-D/2-D, pooling, flatten), ResNets with BatchNorm or LayerNorm (each residual stream
    shares one permutation) and similar ``nn.Sequential``/custom models whose operations
    are listed in docs/connectivity.md. Norm-layer scales, shifts and running statistics
    follow their channels. Where units are merged with another axis (a flatten of
    channels × positions, a concatenation, a grouped convolution) the units involved are
    left unpermuted, which keeps the function exact.

    Parameters
    ----------
    model : nn.Module
    example_input : Tensor, optional
        One small batch the model accepts; guessed from the first layer when omitted.

    Returns
    -------
    PermutationSpec

    Raises
    ------
    UnsupportedOperationError
        For a model with an operation whose effect on hidden units is unknown; the
        message says how to pass ``spec=`` by hand.

    References
    ----------
    Ainsworth, Hayase & Srinivasa (2023), "Git Re-Basin: merging models modulo permutation
    symmetries", ICLR (permutation specs, §3 and appendix).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    inputs = example_input if example_input is not None else guess_example_input(model)
    return traced(model, inputs).spec


@dataclass(frozen=True)
class Traced:
    """A traced forward pass: the graph, the axis variables, and the spec they give."""

    graph_module: Any
    tracer: _Tracer
    names: list[str]
    labels: dict[int, str]
    roots: dict[str, tuple[int, ...]]
    spec: PermutationSpec
    input_shape: tuple[int, ...]


def traced(model: nn.Module, inputs: torch.Tensor) -> Traced:
    """Trace ``model`` on ``inputs`` and derive its permutation spec."""
    graph_module, tracer, names = trace(model, inputs)
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"][:len(names)]
    state = _state(model)
    labels, roots, structure = _group_names(tracer, state, names, placeholders)
    axes = {name: tuple(labels.get(r) for r in roots[name]) for name in names}
    perms: dict[str, int] = {}
    for name, entry in axes.items():
        for axis, perm in enumerate(entry):
            if perm is not None:
                perms.setdefault(perm, int(state[name].shape[axis]))
    for entry in structure.values():  # segments that no parameter carries by itself
        if entry[0] == "cat":
            for part, size in zip(entry[1], entry[2]):
                if part is not None:
                    perms.setdefault(part, int(size))
    perms.update({label: _structured_size(entry) for label, entry in structure.items()})
    for label, entry in structure.items():
        if entry[0] == "heads" and not entry[4]:
            tracer.notes.append(
                f"'{label}': {entry[2]} heads of {entry[3]} features; the heads "
                f"{'move as wholes' if entry[1] else 'stay in place'} but the features within "
                "each head stay in place (an operation pairs or mixes them, e.g. rotary "
                "position embeddings, which rotate pairs of features)")
        elif entry[0] == "heads" and entry[1] is None:
            tracer.notes.append(f"'{label}': the {entry[2]} heads stay in place (only the "
                                "features within each head are permuted)")
        elif entry[0] == "grouped" and entry[2] == 1:
            _, group, g, r, d, base, rho = entry
            within = base is not None and structure[base][4]
            tracer.notes.append(
                f"'{label}': multi-query attention, one key/value head read by {r} query heads "
                f"of {d} features; permuted: "
                + ", ".join([part for part, keep in (
                    ("the query heads", rho is not None),
                    (f"the features (they move with one order, shared by every query head and "
                     f"the key/value head in '{base}')", within)) if keep] or ["none"])
                + "; left in place: "
                + ", ".join([part for part, moved in (
                    ("the query heads", rho is not None),
                    ("the features (an operation pairs or mixes them, e.g. rotary position "
                     "embeddings)", within)) if not moved] or ["nothing"]))
        elif entry[0] == "grouped":
            _, group, g, r, d, base, rho = entry
            within = base is not None and structure[base][4]
            tracer.notes.append(
                f"'{label}': grouped-query attention, {g} key/value groups of {r} query heads "
                f"of {d} features; permuted: "
                + ", ".join([part for part, keep in (
                    ("the groups (as wholes, with their key/value heads"
                     + (f" in '{base}')" if base else ")"), group is not None),
                    ("the query heads within each group", rho is not None),
                    (f"the features within each head (shared by the {r} query heads of a "
                     f"group and its key/value head in '{base}')", within)) if keep] or ["none"])
                + "; left in place: "
                + ", ".join([part for part, moved in (
                    ("the groups", group is not None),
                    ("the query heads within each group", rho is not None),
                    ("the features within each head (an operation pairs or mixes them, e.g. "
                     "rotary position embeddings, or they are not split from one axis)",
                     within)) if not moved] or ["nothing"]))
    if not perms:
        tracer.notes.append("no hidden units can be permuted in this model")
    spec = PermutationSpec(perms, axes, "traced", tuple(dict.fromkeys(tracer.notes)),
                           structure)
    return Traced(graph_module, tracer, names, labels, roots, spec, tuple(inputs.shape))


def spec_for(model: nn.Module, spec: PermutationSpec | Mapping | None,
             inputs: torch.Tensor | None = None) -> PermutationSpec:
    """The given spec checked against the model, or the traced one."""
    if spec is None:
        return permutation_spec(model, example_input=inputs)
    return coerce_spec(spec, model)


