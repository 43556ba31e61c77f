"""Sliced Wasserstein between two networks' representations of the same inputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ridgeline.data.dataset import Dataset
from ridgeline.errors import ConfigError, DataError
from ridgeline.objective import module_mode
from ridgeline.transport.inputs import check_control_variate, check_p, prepare_pair
from ridgeline.transport.projections import check_count, resolve_directions
from ridgeline.transport.sliced import root_stderr, sliced_power
from ridgeline.transport.wasserstein1d import safe_root

__all__ = ["FeatureDistance", "feature_distance", "representations", "default_layer"]

_BATCH = 4096


@dataclass(frozen=True)
class FeatureDistance:
    """SW_p between two models' representations at one layer.

    Attributes
    ----------
    value, stderr : float
        The estimate of SW_p and its standard error.
    layer : str
    p : float
    projections : int
    control_variate : str or None
    num_examples : int
    dim_a, dim_b : int
        Width of the representation of each model (equal, or the distance is undefined).
    per_projection : list of float
        W_p^p(θ_l#μ_A, θ_l#μ_B) for every direction.
    """

    value: float
    stderr: float
    layer: str
    p: float
    projections: int
    control_variate: str | None
    num_examples: int
    dim_a: int
    dim_b: int
    per_projection: list[float]

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        return to_jsonable(asdict(self))

    def plot(self, ax=None):
        """Histogram of the per-direction W_p^p with the estimate of SW_p^p marked."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(5, 3.2)
        ax.hist(self.per_projection, bins=min(40, max(5, len(self.per_projection) // 5)),
                color="0.7", edgecolor="0.4")
        ax.axvline(self.value ** self.p, color="C3",
                   label=f"SW$_{{{self.p:g}}}^{{{self.p:g}}}$ estimate")
        ax.set_xlabel(f"W$_{{{self.p:g}}}^{{{self.p:g}}}$ along a direction")
        ax.set_ylabel("directions")
        ax.set_title(f"layer {self.layer!r}: SW = {self.value:.4g} ± {self.stderr:.2g}")
        ax.legend()
        return ax


def _input_batches(data: Any, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, Dataset):
        data = data.inputs
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        data = data[0]
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size]
        return
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise DataError(f"data must be an inputs tensor, (inputs, targets), a ridgeline Dataset, "
                        f"a DataLoader or an iterable of batches; got {type(data).__name__}.")
    for item in data:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, torch.Tensor):
            raise DataError(f"each batch must be a tensor or (inputs, ...); got "
                            f"{type(batch).__name__}.")
        yield batch


def _module(model: nn.Module, layer: str, which: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        names = [name for name in modules if name]
        raise ConfigError(f"{which} has no module named {layer!r}; its modules are {names}. "
                          "Pass layer= one of these names (nn.Module.named_modules()).")
    return modules[layer]


def default_layer(model: nn.Module) -> str:
    """The last hidden representation: the child before the last of an nn.Sequential."""
    children = [name for name, _ in model.named_children()]
    if not isinstance(model, nn.Sequential) or len(children) < 2:
        raise ConfigError(f"cannot choose a layer of {type(model).__name__} automatically; "
                          f"pass layer= one of {[n for n, _ in model.named_modules() if n]}.")
    return children[-2]


def representations(model: nn.Module, data: Any, layer: str, *, batch_size: int = _BATCH,
                    which: str = "model") -> torch.Tensor:
    """The output of module ``layer`` for every input, flattened to (N, features).

    Captured with a forward hook in eval mode without gradients; the model's train/eval
    flags are restored afterwards.
    """
    module = _module(model, layer, which)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        while isinstance(output, (tuple, list)):
            output = output[0]
        captured.append(output.detach().reshape(output.shape[0], -1))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad(), module_mode(model, False):
            for inputs in _input_batches(data, batch_size):
                inputs = inputs.to(device)
                if dtype is not None and inputs.is_floating_point():
                    inputs = inputs.to(dtype)
                model(inputs)
    finally:
        handle.remove()
    if not captured:
        raise DataError("data yielded no inputs; pass at least one example.")
    return torch.cat(captured)


def feature_distance(model_a: nn.Module, model_b: nn.Module, data: Any, *, layer: str,
                     projections: int = 100, p: float = 2, control_variate: str | None = None,
                     seed: int | torch.Generator | None = 0,
                     batch_size: int = _BATCH) -> FeatureDistance:
    """Sliced Wasserstein distance between two networks' representations of the same inputs.

    With h_A(x), h_B(x) the outputs of module ``layer`` of each model, this estimates
    SW_p(μ_A, μ_B) for the empirical measures μ_A = (1/N) Σ_i δ_{h_A(x_i)} and μ_B likewise
    (see :func:`sliced_wasserstein`). Coordinates are compared as they are: SW is not
    invariant to permuting hidden units, so pass an aligned copy of ``model_b`` (e.g. after
    permutation alignment) to compare up to that symmetry.

    Parameters
    ----------
    model_a, model_b : nn.Module
    data : inputs tensor, (inputs, targets), Dataset, DataLoader or iterable of batches
    layer : str
        A name from ``model.named_modules()`` present in both models.
    projections : int
    p : float ≥ 1
    control_variate : {None, "lower", "upper"}
    seed : int, torch.Generator or None
    batch_size : int
        Inputs per forward pass.

    Returns
    -------
    FeatureDistance

    References
    ----------
    Bonneel et al. (2015); Nguyen & Ho (2024), "Sliced Wasserstein Estimation with Control
    Variates", ICLR.
    """
    p = check_p(p)
    control_variate = check_control_variate(control_variate, p)
    batch_size = check_count(batch_size, "batch_size")
    _module(model_a, layer, "model_a")
    _module(model_b, layer, "model_b")
    features_a = representations(model_a, data, layer, batch_size=batch_size, which="model_a")
    features_b = representations(model_b, data, layer, batch_size=batch_size, which="model_b")
    clouds = prepare_pair(features_a, features_b.to(features_a.device),
                          names=(f"model_a[{layer}]", f"model_b[{layer}]"))
    directions = resolve_directions(projections, clouds.dim, seed, dtype=clouds.x.dtype,
                                    device=clouds.x.device)
    values, power, power_stderr = sliced_power(clouds, directions, p, control_variate)
    return FeatureDistance(
        value=float(safe_root(power, p)), stderr=float(root_stderr(power, power_stderr, p)),
        layer=layer, p=p, projections=int(values.shape[-1]), control_variate=control_variate,
        num_examples=int(features_a.shape[0]), dim_a=int(features_a.shape[1]),
        dim_b=int(features_b.shape[1]), per_projection=values.tolist())
