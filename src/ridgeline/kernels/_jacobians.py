"""Per-example Jacobians of a model and the two ways of contracting them into an NTK.

Internal to :mod:`ridgeline.kernels.ntk`. Two engines work on tiles of examples:

* :class:`JacobianEngine` computes per-example Jacobians with ``vmap(jacrev)`` and
  contracts them layer by layer. A linear layer (``nn.Linear``, :class:`NTKLinear`) that
  sees one feature vector per example keeps its Jacobian factored: ∂f_o/∂W = δ_o ⊗ a,
  with a the layer's input and δ_o = ∂f_o/∂(layer output), so its NTK block is
  (δ_o(x)·δ_q(x')) (a(x)·a(x')) and the (out × in) Jacobian is never formed (the
  structure nngeometry and neural-tangents' "structured derivatives" exploit).
  Every other parameter (conv, norm, embedding, ...) gets its full per-example Jacobian.
* :class:`VectorProductEngine` computes NTK-vector products: the vjps J(x_b)ᵀ e_q of the
  column examples, then ``jvp`` of the batched forward of the row examples along each of
  them, J(X_A) J(x_b)ᵀ e_q (the torch.func tutorial's second recipe).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from ridgeline.errors import ConfigError, ShapeMismatchError, UnsupportedOperationError
from ridgeline.models.layers import NTKLinear

__all__ = ["Factor", "ModelFacts", "Features", "JacobianEngine", "VectorProductEngine",
           "check_model", "probe_model"]


@dataclass(frozen=True)
class Factor:
    """A linear layer whose Jacobian is kept as δ ⊗ a (weight) and δ (bias).

    ``weight_scale2``/``bias_scale2`` are the squared factors multiplying W x and b in the
    layer (1 for ``nn.Linear``; σ_w²/fan_in and σ_b² for :class:`NTKLinear`), zero when that
    parameter is frozen or absent.
    """

    module: str
    params: tuple[str, ...]
    weight_scale2: float
    bias_scale2: float
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelFacts:
    """What the NTK planner knows about a model, from one probe example."""

    num_outputs: int
    output_shape: tuple[int, ...]
    num_params: int
    generic: tuple[str, ...]
    generic_params: int
    factors: tuple[Factor, ...]
    forward_flops: int
    activation_bytes: int
    itemsize: int

    @property
    def factored_features(self) -> int:
        """Numbers stored per example for the factored layers: O·out + in each."""
        return sum(self.num_outputs * f.out_features + f.in_features for f in self.factors)


# ----------------------------------------------------------------------------- checks
def check_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """Refuse modules that couple or randomise examples; return the trainable parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                raise UnsupportedOperationError(
                    f"BatchNorm layer '{name}' is in train mode: it normalises each example with "
                    "the statistics of its batch, so the output for one example depends on the "
                    "others and the NTK is not defined per example. Call model.eval() first "
                    "(the running statistics are then used).")
            if module.running_mean is None:
                raise UnsupportedOperationError(
                    f"BatchNorm layer '{name}' has track_running_stats=False, so it uses batch "
                    "statistics even in eval mode and couples examples; the NTK is not defined "
                    "per example. Use a model with running statistics or LayerNorm/GroupNorm.")
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise UnsupportedOperationError(
                f"Dropout layer '{name}' is in train mode, so the network is random and has no "
                "single NTK. Call model.eval() first.")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters (requires_grad=True), so its "
                          "NTK is zero; unfreeze the parameters to differentiate.")
    return params


def _linear_scales(module: nn.Module) -> tuple[float, float] | None:
    """(weight scale, bias scale) of a linear layer whose output is c·W a + s·b."""
    if type(module) is nn.Linear:
        return 1.0, 1.0
    if type(module) is NTKLinear:
        return module.weight_std / math.sqrt(module.in_features), module.bias_std
    return None


# ----------------------------------------------------------------------------- probe
def _per_example(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, ({**params}, {**buffers}), (x.unsqueeze(0),)).reshape(-1)


def probe_model(model: nn.Module, params: dict[str, torch.Tensor], example: torch.Tensor
                ) -> ModelFacts:
    """Run the model on one example to learn its output size, which linear layers can be
    factored, its forward flops and the activation memory backward keeps per example."""
    from torch.utils.flop_counter import FlopCounterMode

    buffers = {n: b.detach() for n, b in model.named_buffers()}
    counts = {id(p): 0 for _, p in model.named_parameters(remove_duplicate=False)}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] += 1
    candidates: dict[str, tuple[nn.Module, tuple[float, float]]] = {}
    for name, module in model.named_modules():
        scales = _linear_scales(module)
        own = [p for p in module._parameters.values() if p is not None]
        if scales is not None and own and all(counts.get(id(p), 0) == 1 for p in own):
            candidates[name] = (module, scales)
    calls: dict[str, list[tuple[int, ...]]] = {name: [] for name in candidates}

    def recorder(name):
        def hook(module, inputs, output):
            calls[name].append(tuple(inputs[0].shape))
        return hook

    handles = [module.register_forward_hook(recorder(name))
               for name, (module, _) in candidates.items()]
    saved: dict[tuple[int, int], int] = {}
    param_ptrs = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in param_ptrs:
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    grad_params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    try:
        with FlopCounterMode(display=False) as counter, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = functional_call(model, ({**grad_params}, buffers), (example.unsqueeze(0),))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise ShapeMismatchError(
            f"the model cannot be applied to one example of shape {tuple(example.shape)}: {exc}. "
            "Pass inputs shaped (N, *input_shape) as the model expects.") from exc
    finally:
        for handle in handles:
            handle.remove()
    if out.dim() == 0 or out.shape[0] != 1:
        raise ShapeMismatchError(
            f"the model maps a batch of 1 example to an output of shape {tuple(out.shape)}; the "
            "NTK needs one output row per example (shape (N, ...)).")
    factors = []
    for name, (module, (w_scale, b_scale)) in candidates.items():
        shapes = calls[name]
        if len(shapes) != 1 or len(shapes[0]) != 2:
            continue  # called several times or on sequences: keep the generic Jacobian
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        prefix = f"{name}." if name else ""
        names = tuple(prefix + k for k, p in (("weight", weight), ("bias", bias))
                      if p is not None and p.requires_grad)
        if not names:
            continue
        factors.append(Factor(
            name, names,
            w_scale ** 2 if weight is not None and weight.requires_grad else 0.0,
            b_scale ** 2 if bias is not None and bias.requires_grad else 0.0,
            int(module.in_features), int(module.out_features)))
    factored = {n for f in factors for n in f.params}
    generic = tuple(n for n in params if n not in factored)
    num_outputs = int(out[0].numel())
    itemsize = out.element_size()
    flops = int(counter.get_total_flops()) or 2 * sum(p.numel() for p in params.values())
    return ModelFacts(
        num_outputs=num_outputs, output_shape=tuple(out.shape[1:]),
        num_params=sum(p.numel() for p in params.values()), generic=generic,
        generic_params=sum(params[n].numel() for n in generic), factors=tuple(factors),
        forward_flops=flops, activation_bytes=max(sum(saved.values()), num_outputs * itemsize),
        itemsize=itemsize)


# ----------------------------------------------------------------------------- features
@dataclass(frozen=True)
class Features:
    """Per-example Jacobians of a block of examples.

    ``generic`` (n, O, P_generic) holds the full Jacobian of the unfactored parameters;
    ``deltas[k]`` (n, O, out_k) and ``acts[k]`` (n, in_k) the factors of linear layer k.
    """

    generic: torch.Tensor | None
    deltas: tuple[torch.Tensor, ...]
    acts: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        if self.generic is not None:
            return int(self.generic.shape[0])
        return int(self.acts[0].shape[0])

    def rows(self, start: int, stop: int) -> Features:
        return Features(None if self.generic is None else self.generic[start:stop],
                        tuple(d[start:stop] for d in self.deltas),
                        tuple(a[start:stop] for a in self.acts))

    @staticmethod
    def empty(n: int, facts: ModelFacts, *, dtype: torch.dtype, device: torch.device
              ) -> Features:
        """Uninitialised storage for ``n`` examples (filled block by block)."""
        o = facts.num_outputs
        generic = (torch.empty(n, o, facts.generic_params, dtype=dtype, device=device)
                   if facts.generic else None)
        return Features(generic,
                        tuple(torch.empty(n, o, f.out_features, dtype=dtype, device=device)
                              for f in facts.factors),
                        tuple(torch.empty(n, f.in_features, dtype=dtype, device=device)
                              for f in facts.factors))

    def fill(self, start: int, block: Features) -> None:
        stop = start + block.size
        if self.generic is not None:
            self.generic[start:stop] = block.generic
        for dst, src in zip(self.deltas + self.acts, block.deltas + block.acts):
            dst[start:stop] = src


class _Injection:
    """Forward hooks that add a zero perturbation ε to each factored layer's output and
    record the layer's input, so jacrev w.r.t. ε gives δ and the inputs give a."""

    def __init__(self, model: nn.Module, factors: tuple[Factor, ...]) -> None:
        modules = dict(model.named_modules())
        self.modules = [(f.module, modules[f.module]) for f in factors]
        self.eps: dict[str, torch.Tensor] | None = None
        self.acts: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.eps is None:
                return None
            self.acts[name] = inputs[0][0]
            return output + self.eps[name]
        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Injection]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def active(self, eps: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        self.eps, self.acts = eps, {}
        try:
            yield self.acts
        finally:
            self.eps = None


class JacobianEngine:
    """Jacobian contraction: per-example Jacobians by ``vmap(jacrev)``, contracted per layer.

    Cost per pair of examples: O·P_generic + Σ_k (O·out_k + in_k) multiply-adds for the
    traced kernel (O² times the first two terms for the full one).
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], facts: ModelFacts
                 ) -> None:
        self.model, self.facts = model, facts
        self.generic = {n: params[n] for n in facts.generic}
        self.constant = {n: p for n, p in params.items() if n not in self.generic}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.injection = _Injection(model, facts.factors)
        first = next(iter(params.values()))
        self.eps = {f.module: torch.zeros(f.out_features, dtype=first.dtype, device=first.device)
                    for f in facts.factors}

    def _single(self, generic, eps, x):
        with self.injection.active(eps) as acts:
            out = _per_example(self.model, {**generic, **self.constant}, self.buffers, x)
        return out, tuple(acts[f.module] for f in self.facts.factors)

    def features(self, x: torch.Tensor) -> Features:
        """Jacobians of the examples ``x`` (n, ...): generic part and layer factors."""
        n, o = int(x.shape[0]), self.facts.num_outputs
        with self.injection.installed():
            (jac_generic, jac_eps), acts = vmap(
                jacrev(self._single, argnums=(0, 1), has_aux=True),
                in_dims=(None, None, 0))(self.generic, self.eps, x)
        generic = None
        if self.facts.generic:
            generic = torch.cat([jac_generic[name].reshape(n, o, -1) for name in self.facts.generic],
                                dim=2)
        deltas = tuple(jac_eps[f.module] for f in self.facts.factors)
        return Features(generic, deltas, tuple(acts))

    def contract(self, a: Features, b: Features, *, full: bool) -> torch.Tensor:
        """Θ between two blocks: (nA, nB) summed over outputs, or (nA, nB, O, O)."""
        na, nb, o = a.size, b.size, self.facts.num_outputs
        if full:
            tile = None
            if a.generic is not None:
                tile = (a.generic.reshape(na * o, -1) @ b.generic.reshape(nb * o, -1).T
                        ).view(na, o, nb, o)
            for factor, da, db, xa, xb in zip(self.facts.factors, a.deltas, b.deltas, a.acts,
                                              b.acts):
                delta = (da.reshape(na * o, -1) @ db.reshape(nb * o, -1).T).view(na, o, nb, o)
                scale = self._input_factor(factor, xa, xb)[:, None, :, None]
                tile = delta * scale if tile is None else tile.addcmul_(delta, scale)
            return tile.permute(0, 2, 1, 3)
        tile = a.generic.reshape(na, -1) @ b.generic.reshape(nb, -1).T if a.generic is not None \
            else None
        for factor, da, db, xa, xb in zip(self.facts.factors, a.deltas, b.deltas, a.acts, b.acts):
            delta = da.reshape(na, -1) @ db.reshape(nb, -1).T
            scale = self._input_factor(factor, xa, xb)
            tile = delta * scale if tile is None else tile.addcmul_(delta, scale)
        return tile

    @staticmethod
    def _input_factor(factor: Factor, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """c_w² a(x)·a(x') + c_b²: the weight and bias parts of a linear layer's block."""
        gram = xa @ xb.T
        if factor.weight_scale2 != 1.0:
            gram = gram * factor.weight_scale2
        return gram + factor.bias_scale2 if factor.bias_scale2 else gram


class VectorProductEngine:
    """NTK-vector products: Θ(X_A, x_b) e_q = J(X_A) (J(x_b)ᵀ e_q) by ``jvp`` of the batched
    forward along each vjp. Cost per pair of examples: O forward-mode passes."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], facts: ModelFacts
                 ) -> None:
        self.model, self.params, self.facts = model, params, facts
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}

    def vjps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """J(x_b)ᵀ e_q for every example b and output q: (n·O, *shape) per parameter."""
        n, o = int(x.shape[0]), self.facts.num_outputs
        jac = vmap(jacrev(lambda p, xi: _per_example(self.model, p, self.buffers, xi)),
                   in_dims=(None, 0))(self.params, x)
        return {k: v.reshape(n * o, *v.shape[2:]) for k, v in jac.items()}

    def tile(self, x: torch.Tensor, vjps: dict[str, torch.Tensor], *, tangent_chunk: int
             ) -> torch.Tensor:
        """Θ between the examples ``x`` (rows) and those whose vjps are given: (nA, nB, O, O)."""
        na, o = int(x.shape[0]), self.facts.num_outputs
        nb = next(iter(vjps.values())).shape[0] // o

        def batched(p):
            return functional_call(self.model, ({**p}, self.buffers), (x,)).reshape(na, o)

        def along(tangent):
            return jvp(batched, (self.params,), (tangent,))[1]

        out = vmap(along, chunk_size=max(1, int(tangent_chunk)))(vjps)  # (nB·O, nA, O)
        return out.view(nb, o, na, o).permute(2, 0, 3, 1)
