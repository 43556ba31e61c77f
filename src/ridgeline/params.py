"""Parameters as named tensors: flat vectors, arithmetic, random directions.

A *parameter dict* maps names (as in ``model.named_parameters()``) to tensors. It is the
currency of every ridgeline instrument, as in ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ridgeline.errors import (
    ArchitectureMismatchError,
    ConfigError,
    DistributedError,
    ShapeMismatchError,
)

Params = dict[str, torch.Tensor]

__all__ = ["Params", "named_parameters", "named_buffers", "functional_call", "flatten",
           "unflatten", "num_params",
           "dot", "norm", "add", "scale", "sub", "lerp", "zeros_like", "check_same_structure",
           "random_direction", "make_generator", "is_bias_or_norm"]


def named_parameters(model: nn.Module, *, trainable_only: bool = True) -> Params:
    """Detached views of the model's parameters, by name."""
    return {name: p.detach() for name, p in model.named_parameters()
            if p.requires_grad or not trainable_only}


def named_buffers(model: nn.Module) -> Params:
    return {name: b.detach() for name, b in model.named_buffers()}


def functional_call(module: nn.Module,
                    tensors: Mapping[str, torch.Tensor] | tuple[Mapping[str, torch.Tensor], ...],
                    args: Any = (), kwargs: dict[str, Any] | None = None, *,
                    strict: bool = False) -> Any:
    """``torch.func.functional_call`` that leaves a module reachable by several paths intact.

    When one submodule sits at several places of the model (a layer applied twice in an
    ``nn.Sequential``), torch's call with ``tie_weights=True`` swaps its tensors once per
    path and restores the wrong ones (pytorch/pytorch#164759): afterwards the model holds
    the call's plain tensors, which are no longer parameters and do not require grad. Such
    models are called here with every tensor slot (module, attribute) named once and
    ``tie_weights=False``; tensors tied across different modules still receive the value
    given for any one of their names. Other models go straight to torch.
    """
    from torch.func import functional_call as torch_functional_call

    merged: dict[str, torch.Tensor] = {}
    for part in (tensors,) if isinstance(tensors, Mapping) else tensors:
        merged.update(part)
    paths = list(module.named_modules(remove_duplicate=False))
    if len(paths) == len({id(m) for _, m in paths}):
        return torch_functional_call(module, merged, args, kwargs, strict=strict)
    groups: dict[int, list[tuple[str, int, str]]] = {}  # tensor → (name, slot owner, attribute)
    for prefix, owner in paths:
        for attribute, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None:
                name = f"{prefix}.{attribute}" if prefix else attribute
                groups.setdefault(id(tensor), []).append((name, id(owner), attribute))
    expanded = dict(merged)
    for names in groups.values():
        given = next((merged[n] for n, _, _ in names if n in merged), None)
        slots = set()
        for name, owner, attribute in names:
            if (owner, attribute) in slots:
                expanded.pop(name, None)  # one name per slot, or torch restores it twice
                continue
            slots.add((owner, attribute))
            if given is not None:
                expanded[name] = merged.get(name, given)
    return torch_functional_call(module, expanded, args, kwargs, tie_weights=False, strict=strict)


def flatten(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate a parameter dict into one vector (in the dict's order)."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Params:
    """Split a vector into tensors shaped like ``like`` (views, no copy)."""
    total = sum(t.numel() for t in like.values())
    if vector.dim() != 1 or vector.numel() != total:
        raise ShapeMismatchError(f"vector has shape {tuple(vector.shape)} but the parameters "
                                 f"hold {total} values; pass a 1-D vector of length {total}.")
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset:offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out


def num_params(params: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in params.values())


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def norm(a: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(dot(a, a))


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float = 1.0) -> Params:
    """a + alpha · b."""
    return {k: a[k] + alpha * b[k] for k in a}


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(a: Mapping[str, torch.Tensor], factor: float | torch.Tensor) -> Params:
    return {k: factor * v for k, v in a.items()}


def lerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> Params:
    """(1 − alpha) a + alpha b, computed directly (never by accumulating steps)."""
    return {k: torch.lerp(a[k], b[k], alpha) if a[k].is_floating_point() else a[k] for k in a}


def zeros_like(a: Mapping[str, torch.Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def check_same_structure(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                         names: tuple[str, str] = ("model_a", "model_b")) -> None:
    """Raise :class:`ArchitectureMismatchError` listing tensors that differ in name or shape."""
    problems = []
    for key in a:
        if key not in b:
            problems.append(f"'{key}' is in {names[0]} but not in {names[1]}")
        elif tuple(a[key].shape) != tuple(b[key].shape):
            problems.append(f"'{key}' has shape {tuple(b[key].shape)} in {names[1]} but "
                            f"{tuple(a[key].shape)} in {names[0]}")
    problems += [f"'{key}' is in {names[1]} but not in {names[0]}" for key in b if key not in a]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ArchitectureMismatchError(
            f"{names[0]} and {names[1]} do not share one architecture: {shown}. "
            "Both must be built by the same code with the same sizes.")


def make_generator(seed: int | torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator from a seed (``None`` draws a fresh seed), or the generator itself.

    Under torch.distributed every rank must pass the same integer seed (checked)."""
    if isinstance(seed, torch.Generator):
        return seed
    from ridgeline import distributed

    if seed is None and distributed.is_distributed():
        raise DistributedError("seed=None draws a different random seed on every process; under "
                               "torch.distributed pass an integer seed so all ranks agree.")
    if seed is not None:
        distributed.check_consistent(int(seed), "seed")
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def is_bias_or_norm(name: str, tensor: torch.Tensor) -> bool:
    """One-dimensional parameters: biases and norm-layer scales/shifts."""
    return tensor.dim() <= 1


def random_direction(params: Mapping[str, torch.Tensor] | nn.Module, *, kind: str = "gaussian",
                     normalization: str | None = "filter", ignore: str | None = "biasbn",
                     seed: int | torch.Generator | None = 0) -> Params:
    """A random direction in parameter space, normalised as in Li et al. (2018).

    d ~ N(0, I) (``kind="gaussian"``) or Rademacher (``kind="rademacher"``), then

    * ``"filter"``: each filter d_i (row/output channel, i.e. slice along dim 0) is
      rescaled to ‖θ_i‖: d_i ← d_i · ‖θ_i‖ / ‖d_i‖;
    * ``"layer"``: each tensor is rescaled to the norm of the matching tensor of θ;
    * ``"model"``: the whole direction is rescaled to ‖θ‖;
    * ``None``: left as drawn.

    With ``ignore="biasbn"`` one-dimensional parameters (biases, norm-layer weights) are
    zeroed; otherwise a 1-D tensor is normalised as a single filter.

    References
    ----------
    Li, Xu, Taylor, Studer & Goldstein (2018), "Visualizing the loss landscape of neural
    nets", §4 (filter normalisation).
    """
    if isinstance(params, nn.Module):
        params = named_parameters(params)
    if kind not in ("gaussian", "rademacher"):
        raise ConfigError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}.")
    if normalization not in ("filter", "layer", "model", None):
        raise ConfigError(f"normalization must be 'filter', 'layer', 'model' or None, got {normalization!r}.")
    if ignore not in ("biasbn", None):
        raise ConfigError(f"ignore must be 'biasbn' or None, got {ignore!r}.")
    first = next(iter(params.values()))
    gen = make_generator(seed, first.device)
    direction: Params = {}
    for name, theta in params.items():
        if kind == "gaussian":
            d = torch.randn(theta.shape, generator=gen, device=theta.device, dtype=theta.dtype)
        else:
            d = torch.randint(0, 2, theta.shape, generator=gen, device=theta.device).to(theta.dtype) * 2 - 1
        if ignore == "biasbn" and is_bias_or_norm(name, theta):
            d = torch.zeros_like(theta)
        elif normalization == "filter":
            if theta.dim() <= 1:
                d = d * (theta.norm() / d.norm().clamp_min(1e-12))
            else:
                theta_norms = theta.reshape(theta.shape[0], -1).norm(dim=1)
                d_norms = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
                d = d * (theta_norms / d_norms).view(-1, *([1] * (theta.dim() - 1)))
        elif normalization == "layer":
            d = d * (theta.norm() / d.norm().clamp_min(1e-12))
        direction[name] = d
    if normalization == "model":
        theta_norm = norm(params)
        direction = scale(direction, theta_norm / norm(direction).clamp_min(1e-12))
    return direction


def stack_params(dicts: Iterable[Mapping[str, torch.Tensor]]) -> Params:
    """Stack several parameter dicts along a new leading axis (for ``vmap``)."""
    dicts = list(dicts)
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}
