"""Layer-wise linear mode connectivity: move one layer from A toward B, keep the rest at A.

For layer ℓ the path is θ_ℓ(α) = θA + α·Δ_ℓ, where Δ_ℓ = θB − θA on layer ℓ's parameters
and zero elsewhere; its ends are A and the hybrid C_ℓ = A + Δ_ℓ. The layer's barrier is the
barrier of that path (Adilova, Andriushchenko, Kamp, Fischer & Jaggi 2024, "Layer-wise
linear mode connectivity", ICLR).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError
from ridgeline.losses import LossFn
from ridgeline.objective import Objective
from ridgeline.params import named_buffers
from ridgeline.progress import progress_bar

from .paths import PathEngine, PathResult, all_parameters, coerce_pair

__all__ = ["layerwise_barriers", "LayerwiseResult", "layer_groups", "hybrid"]


def layer_groups(params: Mapping[str, torch.Tensor],
                 layers: str | Sequence[str] | Mapping[str, Sequence[str]] = "module"
                 ) -> dict[str, list[str]]:
    """Layer name → its parameter names.

    ``"module"``: parameters grouped by the module owning them (a Linear's weight and bias
    form one layer); ``"tensor"``: every parameter tensor alone; a list of module names or
    parameter-name prefixes; or an explicit ``{layer: [parameter names]}``.
    """
    names = list(params)
    if layers == "module":
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
        return groups
    if layers == "tensor":
        return {name: [name] for name in names}
    if isinstance(layers, Mapping):
        groups = {str(k): list(v) for k, v in layers.items()}
    elif isinstance(layers, str):
        raise ConfigError(f"layers must be 'module', 'tensor', a list of names or a dict; got {layers!r}.")
    else:
        groups = {}
        for prefix in layers:
            members = [n for n in names if n == prefix or n.startswith(prefix + ".")]
            if not members:
                raise ConfigError(f"layer {prefix!r} matches no parameter; parameters are "
                                  f"{names[:10]}{' …' if len(names) > 10 else ''}.")
            groups[str(prefix)] = members
    unknown = [n for members in groups.values() for n in members if n not in params]
    if unknown:
        raise ConfigError(f"layers name parameters the model does not have: {unknown[:6]}.")
    return groups


def hybrid(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
           names: Sequence[str]) -> dict[str, torch.Tensor]:
    """C = A with the parameters ``names`` taken from B."""
    chosen = set(names)
    return {k: (params_b[k] if k in chosen else v) for k, v in params_a.items()}


@dataclass(frozen=True)
class LayerwiseResult:
    """Barrier of each layer's path (only that layer moves from A toward B).

    Attributes
    ----------
    layers : tuple[str, ...]
    parameters : tuple[tuple[str, ...], ...]
        The parameter names of each layer.
    barriers : tuple[float, ...]
        Frankle/Entezari barrier of each layer's path (``paths[i].barrier``).
    paths : tuple[PathResult, ...]
    """

    layers: tuple[str, ...]
    parameters: tuple[tuple[str, ...], ...]
    barriers: tuple[float, ...]
    paths: tuple[PathResult, ...]

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "parameters": [list(p) for p in self.parameters],
                "barriers": list(self.barriers),
                "barriers_midpoint_convention": [p.barrier_midpoint_convention for p in self.paths],
                "error_barriers": [p.error_barrier for p in self.paths],
                "paths": [p.to_dict() for p in self.paths]}

    def plot(self, ax=None):
        """One bar per layer."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(max(4.0, 0.6 * len(self.layers) + 2), 3.2)
        ax.bar(range(len(self.layers)), self.barriers, color="#4c72b0")
        ax.set_xticks(range(len(self.layers)), self.layers, rotation=45, ha="right")
        ax.set_ylabel("barrier (loss)")
        ax.set_title("layer-wise barriers")
        return ax


def layerwise_barriers(model_a: nn.Module | Objective, model_b: nn.Module, data: Any = None, *,
                       layers: str | Sequence[str] | Mapping[str, Sequence[str]] = "module",
                       points: int | Sequence[float] = 25, loss: str | LossFn = "cross_entropy",
                       reset_bn: Any = None, reset_batches: int | None = None,
                       metrics: Sequence[str] = ("loss", "accuracy"),
                       batch_size: int | None = None, progress: bool = False) -> LayerwiseResult:
    """Barrier of every layer: only layer ℓ moves from A toward B, all others stay at A.

    For each layer ℓ, the path θ_ℓ(α) = θA + α Δ_ℓ (Δ_ℓ = θB − θA on layer ℓ, zero
    elsewhere; buffers stay A's, or are re-estimated with ``reset_bn``) is evaluated on the
    α grid and its barrier B_ℓ = max_α [L(θ_ℓ(α)) − ((1−α)L(θA) + αL(C_ℓ))] is reported,
    with C_ℓ = A + Δ_ℓ.

    Parameters
    ----------
    layers : "module", "tensor", list of names, or {layer: [parameter names]}
        How parameters are grouped into layers (see :func:`layer_groups`).
    points, loss, reset_bn, reset_batches, metrics, batch_size, progress
        As in :func:`interpolate`.

    Returns
    -------
    LayerwiseResult

    References
    ----------
    Adilova, Andriushchenko, Kamp, Fischer & Jaggi (2024), "Layer-wise linear mode
    connectivity", ICLR.
    """
    objective, model_b = coerce_pair(model_a, model_b, data, loss, batch_size)
    engine = PathEngine(objective, accuracy="accuracy" in metrics, reset_data=reset_bn,
                        reset_batches=reset_batches, batch_size=batch_size)
    params_a, params_b = all_parameters(objective.model), all_parameters(model_b)
    buffers = named_buffers(objective.model)
    groups = layer_groups(params_a, layers)
    paths = []
    with progress_bar(len(groups), "layer-wise barriers", progress) as bar:
        for layer, names in groups.items():
            end = hybrid(params_a, params_b, names)
            paths.append(engine.path(params_a, end, buffers, buffers, points=points, label=layer))
            bar.advance()
    return LayerwiseResult(tuple(groups), tuple(tuple(v) for v in groups.values()),
                           tuple(p.barrier for p in paths), tuple(paths))
