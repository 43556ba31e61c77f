"""SubspaceModel: train a network in a random d-dimensional affine subspace of its
parameter space, θ = θ₀ + P z (Li et al. 2018)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ridgeline.errors import ConfigError, UnsupportedOperationError
from ridgeline.params import Params, functional_call
from ridgeline.subspace.projections import Projection, make_projection

__all__ = ["SubspaceModel"]


class SubspaceModel(nn.Module):
    """Wrap ``model`` so that its trainable parameters are θ = θ₀ + P z.

    θ₀ ∈ R^D is the model's current parameter vector (its initialisation), P ∈ R^{D×d} a
    fixed random projection and z ∈ R^d, starting at 0, the only ``nn.Parameter``; any
    optimizer (and :func:`ridgeline.train`) trains z alone. The forward pass is
    ``torch.func.functional_call`` on a copy of the model with the parameters θ₀ + P z,
    so gradients reach z as ∂L/∂z = Pᵀ ∇_θ L.

    Parameters
    ----------
    model : nn.Module
        Any module with trainable parameters; it is copied, never modified. Parameters
        with ``requires_grad=False`` stay fixed (kept as buffers). Buffers, e.g.
        BatchNorm running statistics, are carried and updated in train mode as usual.
    dim : int
        d, the subspace dimension, 1 ≤ d ≤ D.
    projection : {"dense", "sparse", "fastfood", "orthogonal"} or Projection
        ``"dense"``: Gaussian with unit-norm columns (D·d memory); ``"sparse"``: very
        sparse random projection (O(d√D)); ``"fastfood"``: stacked Hadamard blocks
        (O(D) memory, O(D log d) time); ``"orthogonal"``: dense with orthonormal columns.
        See :mod:`ridgeline.subspace.projections`.
    seed : int or torch.Generator or None
        Seed of the projection (θ₀ is the model as given).
    memory_budget : int, optional
        Bytes the projection may take; over it, :class:`MemoryBudgetError` is raised
        before anything is allocated.

    Notes
    -----
    ``state_dict()`` holds z, θ₀ and the model's buffers; the projection is rebuilt from
    its seed (its buffers are not persistent), so checkpoints stay O(D).

    References
    ----------
    Li, Farkhoor, Liu & Yosinski (2018), "Measuring the intrinsic dimension of objective
    landscapes", ICLR, §2.
    """

    def __init__(self, model: nn.Module, dim: int, *, projection: str | Projection = "dense",
                 seed: int | torch.Generator | None = 0, memory_budget: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(
                f"{type(model).__name__} has no trainable parameters (none with requires_grad="
                "True); a subspace of an empty parameter space cannot be trained.")
        dtypes = {p.dtype for _, p in trainable}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise UnsupportedOperationError(
                f"the trainable parameters of {type(model).__name__} have dtypes "
                f"{sorted(str(d) for d in dtypes)}; SubspaceModel needs one floating dtype. "
                "Convert the model with .float() or .double() first.")
        num_params = sum(p.numel() for _, p in trainable)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or dim > num_params:
            raise ConfigError(
                f"dim must be an integer with 1 ≤ dim ≤ D = {num_params} (the number of trainable "
                f"parameters of {type(model).__name__}); got {dim!r}.")
        dtype, device = trainable[0][1].dtype, trainable[0][1].device
        self.projection = make_projection(projection, num_params, dim, seed=seed, dtype=dtype,
                                          device=device, memory_budget=memory_budget)
        self.base = _without_parameters(model)
        self.register_buffer("theta0", torch.cat([p.detach().reshape(-1) for _, p in trainable]).clone())
        self.z = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        self._layout = [(name, tuple(p.shape), p.numel()) for name, p in trainable]
        self._aliases = _aliases(model, {name for name, _ in trainable})
        self.seed = seed if isinstance(seed, int) else None

    # ------------------------------------------------------------------ facts
    @property
    def dim(self) -> int:
        """d, the dimension of the trained subspace."""
        return self.projection.dim

    @property
    def num_params(self) -> int:
        """D, the number of parameters of the wrapped model that the subspace drives."""
        return self.projection.num_params

    @property
    def projection_name(self) -> str:
        return self.projection.kind

    # ------------------------------------------------------------------ parameters
    def theta(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """The flat parameter vector θ₀ + P z (differentiable in z)."""
        return self.theta0 + self.projection(self.z if z is None else z)

    def full_parameters(self, z: torch.Tensor | None = None) -> Params:
        """θ₀ + P z as a parameter dict named like the wrapped model's parameters."""
        flat = self.theta(z)
        out, offset = {}, 0
        for name, shape, numel in self._layout:
            out[name] = flat[offset:offset + numel].view(shape)
            offset += numel
        for alias, name in self._aliases.items():
            out[alias] = out[name]
        return out

    def to_full_model(self) -> nn.Module:
        """A plain copy of the wrapped model with parameters θ₀ + P z (and its buffers)."""
        model = copy.deepcopy(self.base)
        with torch.no_grad():
            flat = self.theta().detach().clone()
        made: dict[str, nn.Parameter] = {}
        offset = 0
        for name, shape, numel in self._layout:
            made[name] = nn.Parameter(flat[offset:offset + numel].view(shape).clone())
            offset += numel
        for name, param in [*made.items(), *((a, made[n]) for a, n in self._aliases.items())]:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name).register_parameter(attr, param)
        return model

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.full_parameters(), args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_params={self.num_params}, projection={self.projection_name!r}"


def _without_parameters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its trainable parameters removed (supplied at call time) and
    frozen parameters turned into buffers, so the wrapper's only parameter is z."""
    try:
        base = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - report any copy failure the same way
        raise UnsupportedOperationError(
            f"SubspaceModel copies the model, but copy.deepcopy({type(model).__name__}) "
            f"failed: {exc}. Make the module deep-copyable.") from exc
    for module in base.modules():
        for name, param in list(module._parameters.items()):
            if param is None:  # an absent parameter (bias=False) stays registered as None
                continue
            del module._parameters[name]
            if param is not None and not param.requires_grad:
                module.register_buffer(name, param.detach())
    return base


def _aliases(model: nn.Module, names: set[str]) -> Mapping[str, str]:
    """Names under which a shared (tied) trainable parameter appears a second time."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and first[id(param)] in names:
            aliases[name] = first[id(param)]
        first.setdefault(id(param), name)
    return aliases
