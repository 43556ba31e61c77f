"""Per-example Jacobians of a model and the two ways of contracting them into an NTK.

Internal to :mod:`ridgeline.kernels.ntk`. Two engines work on tiles of examples:

* :class:`JacobianEngine` computes per-example Jacobians with ``vmap(jacrev)`` and
  contracts them layer by layer. A linear layer (``nn.Linear``, :class:`NTKLinear`) that
  sees one feature vector per example keeps its Jacobian factored: ∂f_o/∂W = δ_o ⊗ a,
  with a the layer's input and δ_o = ∂f_o/∂(layer output), so its NTK block is
  (δ_o(x)·δ_q(x')) (a(x)·a(x')) and the (out × in) Jacobian is never formed (the
  structure nngeometry and neural-tangents' "structured derivatives" exploit).
  Every other parameter (conv, norm, embedding, ...) gets its full per-example Jacobian.
  When every parameter sits in a linear or a 1-D/2-D convolution layer (MLPs, plain CNNs)
  no per-example vmap is needed at all: one ``jacrev`` of the *batched* forward w.r.t. a
  perturbation of each layer's output gives δ for every example at once (examples do not
  interact), and a convolution's weight Jacobian is δ contracted with the unfolded input
  patches.
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
from torch.func import jacrev, jvp, vmap

from ridgeline.errors import ConfigError, ShapeMismatchError, UnsupportedOperationError
from ridgeline.models.layers import NTKLinear
from ridgeline.outputs import AttentionRecorder, as_logits, differentiable_attention
from ridgeline.params import functional_call

__all__ = ["Factor", "ModelFacts", "Features", "JacobianEngine", "VectorProductEngine",
           "check_model", "probe_model"]


@dataclass(frozen=True)
class Factor:
    """A layer whose Jacobian is built from δ = ∂f/∂(layer output) and the layer input a.

    ``kind="linear"``: kept factored, δ ⊗ a (weight) and δ (bias); ``weight_scale2`` and
    ``bias_scale2`` are the squared factors multiplying W a and b (1 for ``nn.Linear``;
    σ_w²/fan_in and σ_b² for :class:`NTKLinear`), zero when that parameter is frozen or
    absent. ``kind="conv"``: the weight Jacobian Σ_p δ_p ⊗ patch_p(a) is formed explicitly
    (``conv`` holds kernel size, stride, padding, dilation); ``out_shape`` is the layer's
    output shape for one example.
    """

    module: str
    params: tuple[str, ...]
    weight_scale2: float
    bias_scale2: float
    in_features: int
    out_features: int
    kind: str = "linear"
    out_shape: tuple[int, ...] = ()
    conv: tuple = ()
    has_weight: bool = True
    has_bias: bool = False


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
    batched: bool = False
    generic_sizes: tuple[int, ...] = ()
    attention: bool = False

    @property
    def linear(self) -> tuple[Factor, ...]:
        """The layers kept factored in the contraction."""
        return tuple(f for f in self.factors if f.kind == "linear")

    @property
    def dense_params(self) -> int:
        """Parameters whose per-example Jacobian is formed explicitly (generic and conv)."""
        conv = sum(f.in_features * f.out_features * f.has_weight + f.out_features * f.has_bias
                   for f in self.factors if f.kind == "conv")
        return self.generic_params + conv

    @property
    def dense_blocks(self) -> tuple[int, ...]:
        """Widths of the dense Jacobian blocks, in the order :meth:`JacobianEngine.features`
        makes them (generic parameters, then each convolution's weight and bias)."""
        sizes = list(self.generic_sizes)
        for f in self.factors:
            if f.kind == "conv":
                sizes += [f.in_features * f.out_features] * f.has_weight
                sizes += [f.out_features] * f.has_bias
        return group_sizes(sizes)

    @property
    def factored_features(self) -> int:
        """Numbers stored per example for the factored layers: O·out + in each."""
        return sum(self.num_outputs * f.out_features + f.in_features for f in self.linear)


#: Jacobian blocks narrower than this are concatenated into one (fewer, larger GEMMs)
SMALL_BLOCK = 512


def group_sizes(sizes: list[int]) -> tuple[int, ...]:
    """Block widths after grouping: wide blocks as they are, the narrow ones joined last."""
    small = sum(w for w in sizes if w < SMALL_BLOCK)
    return tuple(w for w in sizes if w >= SMALL_BLOCK) + ((small,) if small else ())


def _group(parts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The same grouping on tensors (n, O, P_k): narrow ones concatenated (one copy)."""
    small = [t for t in parts if t.shape[2] < SMALL_BLOCK]
    wide = tuple(t.contiguous() for t in parts if t.shape[2] >= SMALL_BLOCK)
    return wide + ((torch.cat(small, dim=2),) if small else ())


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


def _layer_kind(module: nn.Module) -> tuple[str, tuple] | None:
    """("linear", (weight scale, bias scale)) for a layer computing c·W a + s·b,
    ("conv", (kernel, stride, padding, dilation)) for a plain 1-D/2-D convolution."""
    if type(module) is nn.Linear:
        return "linear", (1.0, 1.0)
    if type(module) is NTKLinear:
        return "linear", (module.weight_std / math.sqrt(module.in_features), module.bias_std)
    if (type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
        return "conv", (tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                        tuple(module.dilation))
    return None


# ----------------------------------------------------------------------------- probe
def _per_example(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    return as_logits(functional_call(model, ({**params}, {**buffers}), (x.unsqueeze(0),))
                     ).reshape(-1)


def _factor(name: str, module: nn.Module, kind: str, spec: tuple, calls: list) -> Factor | None:
    """The factor of a candidate layer seen in the probe, or None to keep it generic."""
    if len(calls) != 1:
        return None  # called several times: keep the generic Jacobian
    in_shape, out_shape = calls[0]
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    prefix = f"{name}." if name else ""
    trainable = [(k, p) for k, p in (("weight", weight), ("bias", bias))
                 if p is not None and p.requires_grad]
    if not trainable:
        return None
    has_w = weight is not None and weight.requires_grad
    has_b = bias is not None and bias.requires_grad
    names = tuple(prefix + k for k, _ in trainable)
    if kind == "linear":
        if len(in_shape) != 2:
            return None  # a linear layer on sequences: keep the generic Jacobian
        w_scale, b_scale = spec
        return Factor(name, names, w_scale ** 2 if has_w else 0.0, b_scale ** 2 if has_b else 0.0,
                      int(module.in_features), int(module.out_features), has_weight=has_w,
                      has_bias=has_b)
    if len(in_shape) != len(spec[0]) + 2:
        return None  # unbatched convolution input
    patch = module.in_channels * math.prod(spec[0])
    return Factor(name, names, 1.0 if has_w else 0.0, 1.0 if has_b else 0.0, int(patch),
                  int(module.out_channels), kind="conv", out_shape=tuple(out_shape[1:]),
                  conv=spec, has_weight=has_w, has_bias=has_b)


def probe_model(model: nn.Module, params: dict[str, torch.Tensor], example: torch.Tensor
                ) -> ModelFacts:
    """Run the model on one example to learn its output size, which layers can be
    factored, its forward flops and the activation memory backward keeps per example."""
    from torch.utils.flop_counter import FlopCounterMode

    buffers = {n: b.detach() for n, b in model.named_buffers()}
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    candidates: dict[str, tuple[nn.Module, str, tuple]] = {}
    for name, module in model.named_modules():
        kind = _layer_kind(module)
        own = [p for p in module._parameters.values() if p is not None]
        if kind is not None and own and all(counts.get(id(p), 0) == 1 for p in own):
            candidates[name] = (module, *kind)
    calls: dict[str, list] = {name: [] for name in candidates}

    def recorder(name):
        def hook(module, inputs, output):
            calls[name].append((tuple(inputs[0].shape), tuple(output.shape)))
        return hook

    handles = [module.register_forward_hook(recorder(name))
               for name, (module, _, _) in candidates.items()]
    saved: dict[tuple[int, int], int] = {}
    param_ptrs = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in param_ptrs:
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    grad_params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    try:
        with FlopCounterMode(display=False) as counter, AttentionRecorder() as recorder, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = as_logits(functional_call(model, ({**grad_params}, buffers),
                                            (example.unsqueeze(0),)))
    except ShapeMismatchError:
        raise
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
    factors = [f for name, (module, kind, spec) in candidates.items()
               if (f := _factor(name, module, kind, spec, calls[name])) is not None]
    covered = {n for f in factors for n in f.params}
    batched = all(n in covered for n in params)
    if not batched:  # per-example Jacobians by vmap(jacrev): convolutions stay generic there
        factors = [f for f in factors if f.kind == "linear"]
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
        itemsize=itemsize, batched=batched, generic_sizes=tuple(params[n].numel() for n in generic),
        attention=recorder.seen)


# ----------------------------------------------------------------------------- features
@dataclass(frozen=True)
class Features:
    """Per-example Jacobians of a block of examples.

    ``dense`` holds blocks (n, O, P_k) of the explicit Jacobian of the generic and
    convolution parameters; ``deltas[k]`` (n, O, out_k) and ``acts[k]`` (n, in_k) the
    factors of linear layer k.
    """

    dense: tuple[torch.Tensor, ...]
    deltas: tuple[torch.Tensor, ...]
    acts: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        return int((self.dense + self.acts)[0].shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return (self.dense + self.acts)[0].dtype

    def rows(self, start: int, stop: int) -> Features:
        return Features(tuple(t[start:stop] for t in self.dense),
                        tuple(d[start:stop] for d in self.deltas),
                        tuple(a[start:stop] for a in self.acts))

    @staticmethod
    def empty(n: int, facts: ModelFacts, *, dtype: torch.dtype, device: torch.device
              ) -> Features:
        """Uninitialised storage for ``n`` examples (filled block by block)."""
        o = facts.num_outputs
        dense = tuple(torch.empty(n, o, w, dtype=dtype, device=device) for w in facts.dense_blocks)
        return Features(dense,
                        tuple(torch.empty(n, o, f.out_features, dtype=dtype, device=device)
                              for f in facts.linear),
                        tuple(torch.empty(n, f.in_features, dtype=dtype, device=device)
                              for f in facts.linear))

    def fill(self, start: int, block: Features) -> None:
        stop = start + block.size
        for dst, src in zip(self.dense + self.deltas + self.acts,
                            block.dense + block.deltas + block.acts):
            dst[start:stop] = src


class _Injection:
    """Forward hooks that add a zero perturbation ε to each factored layer's output and
    record the layer's input, so jacrev w.r.t. ε gives δ and the inputs give a.

    Per-example mode (under ``vmap``) drops the batch axis of size 1 from the inputs;
    batched mode keeps the whole batch."""

    def __init__(self, model: nn.Module, factors: tuple[Factor, ...]) -> None:
        modules = dict(model.named_modules())
        self.modules = [(f.module, modules[f.module]) for f in factors]
        self.eps: dict[str, torch.Tensor] | None = None
        self.acts: dict[str, torch.Tensor] = {}
        self.batched = False

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.eps is None:
                return None
            self.acts[name] = inputs[0] if self.batched else inputs[0][0]
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
    def active(self, eps: dict[str, torch.Tensor], *, batched: bool = False
               ) -> Iterator[dict[str, torch.Tensor]]:
        self.eps, self.acts, self.batched = eps, {}, batched
        try:
            yield self.acts
        finally:
            self.eps = None


def _conv_jacobian(factor: Factor, delta: torch.Tensor, act: torch.Tensor) -> list[torch.Tensor]:
    """Per-example Jacobians of a convolution's weight and bias, (n, O, ·) each:
    J_W[n, o] = Σ_p δ[n, o, :, p] ⊗ patch_p(a_n), J_b[n, o] = Σ_p δ[n, o, :, p]."""
    n, o = delta.shape[0], delta.shape[1]
    delta = delta.reshape(n, o, factor.out_features, -1)  # (n, O, C_out, positions)
    parts = []
    if factor.has_weight:
        kernel, stride, padding, dilation = factor.conv
        if len(kernel) == 1:  # 1-D: unfold a (n, C, 1, L) image with a (1, k) kernel
            act = act.unsqueeze(2)
            kernel, stride, padding, dilation = ((1, *kernel), (1, *stride), (0, *padding),
                                                 (1, *dilation))
        patches = torch.nn.functional.unfold(act, kernel, dilation=dilation, padding=padding,
                                             stride=stride)  # (n, C_in·k, positions)
        weight = torch.bmm(delta.reshape(n, o * factor.out_features, -1), patches.transpose(1, 2))
        parts.append(weight.reshape(n, o, -1))
    if factor.has_bias:
        parts.append(delta.sum(-1))
    return parts


class JacobianEngine:
    """Jacobian contraction: per-example Jacobians, contracted layer by layer.

    Cost per pair of examples: O·P_dense + Σ_k (O·out_k + in_k) multiply-adds for the
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
        self.dtype, self.device = first.dtype, first.device

    def _single(self, generic, eps, x):
        with self.injection.active(eps) as acts:
            out = _per_example(self.model, {**generic, **self.constant}, self.buffers, x)
        return out, tuple(acts[f.module] for f in self.facts.factors)

    def _batch(self, eps, x):
        with self.injection.active(eps, batched=True) as acts:
            out = as_logits(functional_call(self.model, ({**self.constant}, self.buffers), (x,)))
        return out.reshape(x.shape[0], -1).sum(0), tuple(acts[f.module] for f in self.facts.factors)

    def features(self, x: torch.Tensor) -> Features:
        """Jacobians of the examples ``x`` (n, ...): dense part and linear-layer factors.

        Models made only of linear and convolution layers get every δ from one ``jacrev``
        of the batched forward (Σ_n f(x_n) w.r.t. per-example perturbations); others use
        ``vmap(jacrev)`` over examples, w.r.t. the generic parameters and the perturbations.
        """
        n, o = int(x.shape[0]), self.facts.num_outputs
        with self.injection.installed():
            if self.facts.batched:
                eps = {f.module: torch.zeros((n, *self._out_shape(f)), dtype=self.dtype,
                                             device=self.device) for f in self.facts.factors}
                jac_eps, acts = jacrev(self._batch, has_aux=True)(eps, x)
                jac_eps = {k: v.transpose(0, 1).contiguous() for k, v in jac_eps.items()}  # (n, O, ...)
                jac_generic = {}
            else:
                eps = {f.module: torch.zeros(self._out_shape(f), dtype=self.dtype,
                                             device=self.device) for f in self.facts.factors}
                (jac_generic, jac_eps), acts = vmap(
                    jacrev(self._single, argnums=(0, 1), has_aux=True),
                    in_dims=(None, None, 0))(self.generic, eps, x)
        dense = [jac_generic[name].reshape(n, o, -1) for name in self.facts.generic]
        deltas, linear_acts = [], []
        for factor, act in zip(self.facts.factors, acts):
            if factor.kind == "conv":
                dense += _conv_jacobian(factor, jac_eps[factor.module], act)
            else:
                deltas.append(jac_eps[factor.module])
                linear_acts.append(act)
        return Features(_group(dense), tuple(deltas), tuple(linear_acts))

    @staticmethod
    def _out_shape(factor: Factor) -> tuple[int, ...]:
        return factor.out_shape if factor.kind == "conv" else (factor.out_features,)

    def contract(self, a: Features, b: Features, *, full: bool) -> torch.Tensor:
        """Θ between two blocks: (nA, nB) summed over outputs, or (nA, nB, O, O)."""
        na, nb, o = a.size, b.size, self.facts.num_outputs
        linear = self.facts.linear
        if full:
            tile = None
            for da, db in zip(a.dense, b.dense):
                left, right = da.reshape(na * o, -1), db.reshape(nb * o, -1).T
                tile = left @ right if tile is None else tile.addmm_(left, right)
            if tile is not None:
                tile = tile.view(na, o, nb, o)
            for factor, da, db, xa, xb in zip(linear, a.deltas, b.deltas, a.acts, b.acts):
                delta = (da.reshape(na * o, -1) @ db.reshape(nb * o, -1).T).view(na, o, nb, o)
                scale = self._input_factor(factor, xa, xb)[:, None, :, None]
                tile = delta * scale if tile is None else tile.addcmul_(delta, scale)
            return tile.permute(0, 2, 1, 3)
        tile = None
        for da, db in zip(a.dense, b.dense):
            left, right = da.reshape(na, -1), db.reshape(nb, -1).T
            tile = left @ right if tile is None else tile.addmm_(left, right)
        for factor, da, db, xa, xb in zip(linear, a.deltas, b.deltas, a.acts, b.acts):
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
    forward along each vjp. Cost per pair of examples: O forward-mode passes (through the
    MATH backend of ``scaled_dot_product_attention`` when the model calls it)."""

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
            return as_logits(functional_call(self.model, ({**p}, self.buffers), (x,))
                             ).reshape(na, o)

        def along(tangent):
            return jvp(batched, (self.params,), (tangent,))[1]

        with differentiable_attention(self.facts.attention):  # forward mode through attention
            out = vmap(along, chunk_size=max(1, int(tangent_chunk)))(vjps)  # (nB·O, nA, O)
        return out.view(nb, o, na, o).permute(2, 0, 3, 1)
