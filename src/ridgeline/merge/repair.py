"""REPAIR for a merged network: rescale each hidden unit so that its pre-activation
statistics over data equal the weighted mean of the merged models' (Jordan et al. 2023),
baked into the weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ridgeline.errors import UnsupportedOperationError

__all__ = ["repair_merged"]


def _hidden_modules(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Modules whose weight's first axis is a permuted hidden axis (Linear/Conv rows)."""
    from ridgeline.connectivity import permutation_spec

    try:
        spec = permutation_spec(model, example_input=example)
    except UnsupportedOperationError as exc:
        raise UnsupportedOperationError(f"REPAIR needs to know the hidden layers: {exc}") from exc
    names: list[str] = []
    for tensor, axes in spec.axes.items():
        module, _, leaf = tensor.rpartition(".")
        if leaf == "weight" and len(axes) >= 2 and axes[0] is not None and module not in names:
            names.append(module)
    return names


def _channel_stats(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Per-channel mean and standard deviation of each module's output over the batches,
    and the order in which the modules ran."""
    sums: dict[str, list] = {}
    order: list[str] = []
    handles = []

    def make(name: str):
        def hook(_module, _inputs, out):
            if name not in order:
                order.append(name)
            dim = 1 if out.dim() > 2 else -1
            flat = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim]).double()
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += flat.shape[0]
            acc[1] = acc[1] + flat.sum(0)
            acc[2] = acc[2] + (flat * flat).sum(0)
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(make(name)))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags:
            m.training = flag
    stats = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        stats[name] = (mean, (squares / count - mean ** 2).clamp_min(0).sqrt())
    return stats, order


def repair_merged(merged: nn.Module, endpoints: Sequence[nn.Module], weights: Sequence[float],
                  batches: Sequence[torch.Tensor]) -> tuple[nn.Module, list[str]]:
    """Rescale the merged network's hidden units in place, layer by layer in forward order:
    with μ, σ the channel's mean and std in the merge and μ* = Σ w̄_i μ_i, σ* = Σ w̄_i σ_i
    the targets from the models, the unit's row of weights and its bias become
    W ← s W, b ← s b + (μ* − s μ), s = σ*/σ. Each layer is measured after the layers
    before it are corrected (a unit without bias gets the scale only). Returns the model
    and notes."""
    names = _hidden_modules(merged, batches[0][:2])
    total = float(sum(weights))
    targets: dict[str, list[torch.Tensor]] = {}
    for model, w in zip(endpoints, weights):
        stats, _ = _channel_stats(model, names, batches)
        for name, (mean, std) in stats.items():
            acc = targets.setdefault(name, [0.0, 0.0])
            acc[0] = acc[0] + (w / total) * mean
            acc[1] = acc[1] + (w / total) * std
    _, order = _channel_stats(merged, names, batches[:1])
    notes = []
    for name in order:
        (mean, std), = [_channel_stats(merged, [name], batches)[0][name]]
        target_mean, target_std = targets[name]
        scale = target_std / std.clamp_min(1e-12)
        shift = target_mean - mean * scale
        module = merged.get_submodule(name)
        with torch.no_grad():
            view = (-1,) + (1,) * (module.weight.dim() - 1)
            module.weight.mul_(scale.to(module.weight.dtype).view(view))
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(scale.to(module.bias.dtype)).add_(shift.to(module.bias.dtype))
            else:
                notes.append(f"REPAIR: {name} has no bias; only its scale was corrected.")
    return merged, notes
