"""Local guesses: gradients of auxiliary block losses as guess directions (Fournier et al.).

The network is split into consecutive blocks. Every block but the last gets a small
auxiliary head that predicts the targets from the block's output; the gradient of that
local loss with respect to the block's own parameters (the block's input detached, so the
backward pass stays inside the block) is the block's guess direction u_b. The last block
ends at the network's output, so its local loss *is* the global loss and its guess is its
exact gradient. The forward gradient then projects the global gradient of each block on
its guess: ĝ_b = (∇_{θ_b}L · u_b / ‖u_b‖²) u_b, one jvp per block.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value

from ridgeline.errors import ConfigError, DataError, UnsupportedOperationError
from ridgeline.gradients.guesses import Guess, GuessBatch
from ridgeline.losses import LossFn, resolve_loss
from ridgeline.objective import Objective, module_mode
from ridgeline.outputs import as_logits
from ridgeline.params import Params, functional_call

__all__ = ["LocalGuess", "sequential_atoms", "count_macs", "SpatialMean"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class SpatialMean(nn.Module):
    """Mean over the positions of a conv feature map (N, C, ...) → (N, C); flattens
    anything else to (N, features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1) if x.dim() > 2 else x.flatten(1)


def sequential_atoms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as a chain of (name, module) applied one after the other.

    Expands ``nn.Sequential`` containers recursively and ridgeline's ``resnet``
    (add_channel → stem → stages → pool → flatten → head).
    """
    from ridgeline.models.resnet import ResNet

    def children(module: nn.Module) -> list[tuple[str, nn.Module]]:
        if isinstance(module, ResNet):
            return [(n, getattr(module, n)) for n in
                    ("add_channel", "stem", "stages", "pool", "flatten", "head")]
        return list(module.named_children())

    if not isinstance(model, (nn.Sequential, ResNet)):
        raise UnsupportedOperationError(
            f"LocalGuess splits nn.Sequential models and ridgeline's resnet into blocks, but got "
            f"{type(model).__name__}, whose forward order it cannot know. Wrap the network as an "
            "nn.Sequential of its stages, or use guess='random' / a callable guess.")
    atoms: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in children(module):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (nn.Sequential, ResNet)):
                walk(child, full)
            else:
                atoms.append((full, child))

    walk(model, "")
    return atoms


def _finest_units(atoms: list[tuple[str, nn.Module]]) -> list[list[int]]:
    """One unit per parametrised non-norm atom; norms and parameter-free atoms join the
    unit before them (leading parameter-free atoms join the first unit)."""
    units: list[list[int]] = []
    pending: list[int] = []
    for index, (_, module) in enumerate(atoms):
        has_params = any(p.requires_grad for p in module.parameters())
        if has_params and not isinstance(module, _NORMS):
            units.append(pending + [index])
            pending = []
        elif units:
            units[-1].append(index)
        else:
            pending.append(index)
    if not units:
        raise ConfigError("the model has no trainable layers to split into blocks.")
    units[-1] += pending
    return units


def _group(units: list[list[int]], blocks: int | Sequence[int] | None) -> list[list[int]]:
    if blocks is None:
        return units
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        if not 1 <= blocks <= len(units):
            raise ConfigError(f"blocks={blocks} but the model splits into at most {len(units)} "
                              f"blocks (one per layer); choose 1 … {len(units)}.")
        sizes = [len(part) for part in torch.arange(len(units)).tensor_split(blocks)]
    else:
        sizes = [int(s) for s in blocks]
        if any(s < 1 for s in sizes) or sum(sizes) != len(units):
            raise ConfigError(f"blocks={list(sizes)} must be positive layer counts summing to "
                              f"{len(units)} (the model's layers in order).")
    grouped, start = [], 0
    for size in sizes:
        grouped.append([i for unit in units[start:start + size] for i in unit])
        start += size
    return grouped


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``example`` through Linear and Conv
    layers (plus the additions of SpatialMean pooling), per example."""
    from ridgeline.models.layers import NTKLinear

    total = [0]

    def hook(layer, inputs, output):
        if isinstance(layer, (nn.Linear, NTKLinear)):
            total[0] += output.numel() * layer.in_features
        elif isinstance(layer, nn.modules.conv._ConvNd):
            total[0] += output.numel() * (layer.in_channels // layer.groups) * math.prod(
                layer.kernel_size)
        elif isinstance(layer, SpatialMean) and inputs[0].dim() > 2:
            total[0] += inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad(), module_mode(module, False):
            module(example)
    finally:
        for h in handles:
            h.remove()
    return total[0] // max(int(example.shape[0]), 1)


class LocalGuess(Guess):
    """Guess directions from local losses of blocks with auxiliary heads.

    The model (an ``nn.Sequential`` or ridgeline's ``resnet``) is split into blocks; block b
    gets a head h_b (``"linear"``: pool over positions, then Linear(C_b, O); ``"mlp"``: pool,
    Linear(C_b, w), ReLU, Linear(w, O)). The guess for block b is u_b = ∇_{θ_b} ℓ(h_b(z_b), y)
    with z_b = block_b(z_{b−1}) and z_{b−1} detached (backprop stays inside the block). The
    last block has no head: its local loss is the global loss, so u_B is its exact gradient.
    The heads are trained alongside (their own Adam optimizer): after every estimate
    (``observe``) they take a step on the same local-loss gradients, and :meth:`fit` trains
    them on data with the network frozen. The heads' multiply-accumulates are reported as a
    fraction of the network's (:attr:`flops`); over ``flop_budget`` a warning is issued.

    Parameters
    ----------
    model : nn.Module
    blocks : None, int or sequence of int
        ``None``: one block per layer (Linear/Conv/residual block, with its norm and
        activation); an int n merges the layers into n contiguous blocks of nearly equal
        layer counts; a list gives the number of layers per block.
    head : {"linear", "mlp"}
    head_width : int, optional
        Hidden width of ``"mlp"`` heads; default: the largest width ≤ 64 keeping all heads
        within ``flop_budget`` of the network's multiply-accumulates.
    loss : {"cross_entropy", "mse"} or callable
        The local loss (and the loss of :meth:`fit`); an Objective's own loss is used when
        the guess is called with one.
    lr : float
        Learning rate of the heads' Adam optimizer.
    train_heads : bool
        Step the heads after every estimate made with this guess.
    train_mode : bool
        Evaluate the network in train mode (BatchNorm batch statistics).
    flop_budget : float
    seed : int
        Initialisation of the heads (the global RNG is left untouched).

    References
    ----------
    Fournier, Rivaud, Belilovsky, Eickenberg & Oyallon (2023), "Can forward gradient match
    backpropagation?", ICML; Belilovsky, Eickenberg & Oyallon (2020), "Decoupled greedy
    learning of CNNs".
    """

    name = "local"
    stochastic = False

    def __init__(self, model: nn.Module, *, blocks: int | Sequence[int] | None = None,
                 head: str = "linear", head_width: int | None = None,
                 loss: str | LossFn = "cross_entropy", lr: float = 1e-3,
                 train_heads: bool = True, train_mode: bool = False, flop_budget: float = 0.10,
                 seed: int = 0) -> None:
        if head not in ("linear", "mlp"):
            raise ConfigError(f"head must be 'linear' or 'mlp', got {head!r}.")
        if head_width is not None and head_width < 1:
            raise ConfigError(f"head_width must be a positive integer, got {head_width}.")
        self.model = model
        self.atoms = sequential_atoms(model)
        self.block_atoms = _group(_finest_units(self.atoms), blocks)
        self.head_kind, self.head_width = head, head_width
        self.loss_fn = resolve_loss(loss)[1]
        self.lr, self.train_heads, self.train_mode = float(lr), bool(train_heads), bool(train_mode)
        self.flop_budget, self.seed = float(flop_budget), int(seed)
        self.heads: nn.ModuleList | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.flops: dict[str, float] = {}
        self.last_head_grads: list[Params] | None = None
        self.last_local_losses: torch.Tensor | None = None

    # ------------------------------------------------------------------ structure
    @property
    def num_blocks(self) -> int:
        return len(self.block_atoms)

    def block_names(self) -> list[list[str]]:
        """The atom (module) names in each block."""
        return [[self.atoms[i][0] for i in block] for block in self.block_atoms]

    def block_params(self, params: Mapping[str, torch.Tensor] | None = None) -> list[list[str]]:
        """The parameter names of each block (restricted to ``params`` when given)."""
        out = []
        for block in self.block_atoms:
            names = [f"{self.atoms[i][0]}.{n}" for i in block
                     for n, p in self.atoms[i][1].named_parameters() if p.requires_grad]
            out.append([n for n in names if params is None or n in params])
        return out

    def build(self, inputs: torch.Tensor) -> LocalGuess:
        """Create the heads for inputs like ``inputs`` (done automatically on first use)."""
        if self.heads is not None:
            return self
        example = inputs[:1]
        param = next(self.model.parameters())
        shapes = []
        with torch.no_grad(), module_mode(self.model, False):
            z = example
            for block in self.block_atoms:
                for i in block:
                    z = self.atoms[i][1](z)
                shapes.append(tuple(z.shape[1:]))
        out_features = int(shapes[-1][-1])
        model_macs = count_macs(self.model, example)
        channels = [int(s[0]) if len(s) > 0 else 1 for s in shapes[:-1]]
        width = self.head_width
        if self.head_kind == "mlp" and width is None:
            pooling = sum(math.prod(s) for s in shapes[:-1] if len(s) > 1)
            per_unit = sum(c + out_features for c in channels)
            width = max(1, min(64, int((self.flop_budget * model_macs - pooling) // max(per_unit, 1))))
        self.head_width = width

        def make_head(c: int) -> nn.Module:
            if self.head_kind == "linear":
                return nn.Sequential(SpatialMean(), nn.Linear(c, out_features))
            return nn.Sequential(SpatialMean(), nn.Linear(c, width), nn.ReLU(),
                                 nn.Linear(width, out_features))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            heads = nn.ModuleList([make_head(c) for c in channels])
        self.heads = heads.to(device=param.device, dtype=param.dtype)
        head_macs = 0
        with torch.no_grad(), module_mode(self.model, False):
            z = example.to(param.device)
            for b, block in enumerate(self.block_atoms[:-1]):
                for i in block:
                    z = self.atoms[i][1](z)
                head_macs += count_macs(self.heads[b], z)
        self.flops = {"model_macs": float(model_macs), "head_macs": float(head_macs),
                      "ratio": head_macs / max(model_macs, 1)}
        if self.flops["ratio"] > self.flop_budget:
            warnings.warn(f"the auxiliary heads cost {100 * self.flops['ratio']:.1f} % of the "
                          f"network's multiply-accumulates (budget {100 * self.flop_budget:.0f} %); "
                          "use head='linear', fewer blocks, or a smaller head_width.", stacklevel=2)
        self.optimizer = torch.optim.Adam(self.heads.parameters(), lr=self.lr)
        return self

    # ------------------------------------------------------------------ local gradients
    def _run(self, block: list[int], params: Mapping[str, torch.Tensor],
             buffers: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        for i in block:
            name, module = self.atoms[i]
            prefix = name + "."
            local = {k[len(prefix):]: v for k, v in {**buffers, **params}.items()
                     if k.startswith(prefix)}
            z = functional_call(module, local, (z,), strict=False) if local else module(z)
        return z

    def local_gradients(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                        targets: torch.Tensor, *, loss_fn: LossFn | None = None,
                        train_mode: bool | None = None, guesses: bool = True
                        ) -> tuple[Params, list[Params], torch.Tensor]:
        """(u, head gradients, local losses) on one batch.

        u maps each block's parameter names to ∇_{θ_b} ℓ_b (empty when ``guesses=False``,
        which also skips the last block); head gradients are ∇_{φ_b} ℓ_b per head.
        """
        self.build(inputs)
        assert self.heads is not None  # built above
        loss_fn = loss_fn or self.loss_fn
        train_mode = self.train_mode if train_mode is None else train_mode
        buffers = {k: (v.clone() if train_mode else v.detach()) for k, v in self.model.named_buffers()}
        names = self.block_params(params)
        guess: Params = {}
        head_grads: list[Params] = []
        losses = []
        z = inputs
        last = self.num_blocks - 1
        with module_mode(self.model, train_mode), module_mode(self.heads, train_mode):
            for b, block in enumerate(self.block_atoms):
                z_in = z.detach()
                theta = {n: params[n].detach() for n in names[b]}
                if b == last:
                    if not guesses:
                        break

                    def final(th, bufs, block=block, z_in=z_in):
                        out = as_logits(self._run(block, th, bufs, z_in))
                        return loss_fn(out, targets), out

                    g, (value, z) = grad_and_value(final, has_aux=True)(theta, buffers)
                    guess.update(g)
                    losses.append(value.detach())
                    continue
                head = self.heads[b]
                phi = {n: p.detach() for n, p in head.named_parameters()}

                # buffers are arguments, not captured, so BatchNorm may update its copies
                def local(th, ph, bufs, block=block, head=head, z_in=z_in):
                    out = self._run(block, th, bufs, z_in)
                    return loss_fn(functional_call(head, ph, (out,)), targets), out

                if guesses:
                    (g, gh), (value, z) = grad_and_value(local, argnums=(0, 1), has_aux=True)(
                        theta, phi, buffers)
                    guess.update(g)
                else:
                    gh, (value, z) = grad_and_value(local, argnums=1, has_aux=True)(
                        theta, phi, buffers)
                head_grads.append({n: t.detach() for n, t in gh.items()})
                losses.append(value.detach())
                z = z.detach()
        return ({n: t.detach() for n, t in guess.items()}, head_grads,
                torch.stack(losses) if losses else torch.zeros(0))

    def __call__(self, objective: Objective, params: Params, *, num_guesses: int,
                 generator: torch.Generator) -> GuessBatch:
        if num_guesses != 1:
            raise ConfigError(f"a local guess gives one direction per block; num_guesses must be "
                              f"1, got {num_guesses}.")
        self.build(next(objective.per_batch(shard=False)).inputs)

        def per_batch(x, y):
            guess, head_grads, losses = self.local_gradients(
                params, x, y, loss_fn=objective.loss_fn, train_mode=objective.train_mode)
            return {"guess": guess, "heads": head_grads, "losses": losses}

        out = objective.batch_mean(per_batch)
        self.last_head_grads, self.last_local_losses = out["heads"], out["losses"]
        directions = {n: out["guess"][n][None] for n in params}
        blocks = tuple(tuple(b) for b in self.block_params(params))
        first = next(iter(params.values()))
        return GuessBatch(directions, torch.zeros(1, dtype=torch.bool, device=first.device), blocks)

    # ------------------------------------------------------------------ head training
    def step_heads(self, head_grads: list[Params] | None = None) -> None:
        """One optimizer step of the heads on the given (default: the last) gradients."""
        head_grads = self.last_head_grads if head_grads is None else head_grads
        if head_grads is None or self.heads is None or self.optimizer is None:
            return
        for head, grads in zip(self.heads, head_grads):
            for name, p in head.named_parameters():
                p.grad = grads[name].to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_head_grads = None

    def observe(self, estimate: Params) -> None:
        if self.train_heads:
            self.step_heads()

    def fit(self, data: Any, *, epochs: int = 5, batch_size: int = 128,
            seed: int = 0) -> LocalGuess:
        """Train the heads on ``data`` with the network frozen (Adam, shuffled mini-batches).

        ``data`` is a Dataset, an (inputs, targets) pair or an Objective (whose batches are
        split into mini-batches). Returns ``self``; the mean local losses of the last epoch
        are in :attr:`last_local_losses`.
        """
        if epochs < 0 or batch_size < 1:
            raise ConfigError(f"fit needs epochs ≥ 0 and batch_size ≥ 1, got {epochs}, {batch_size}.")
        objective = data if isinstance(data, Objective) else Objective(
            self.model, data, self.loss_fn, validate=False)
        params = objective.params()
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            total, count = None, 0
            for batch in objective.per_batch():
                if batch.size == 0:
                    raise DataError("fit got an empty batch.")
                order = torch.randperm(batch.size, generator=gen).to(batch.inputs.device)
                for start in range(0, batch.size, batch_size):
                    idx = order[start:start + batch_size]
                    _, head_grads, losses = self.local_gradients(
                        params, batch.inputs[idx], batch.targets[idx],
                        loss_fn=objective.loss_fn, train_mode=objective.train_mode, guesses=False)
                    self.step_heads(head_grads)
                    total = losses * len(idx) if total is None else total + losses * len(idx)
                    count += len(idx)
            self.last_local_losses = None if total is None else total / count
        if epochs == 0:
            self.build(next(objective.per_batch(shard=False)).inputs)
        return self

    def describe(self) -> dict:
        return {"guess": "local", "blocks": self.block_names(), "head": self.head_kind,
                "head_width": self.head_width, "flops": dict(self.flops)}
