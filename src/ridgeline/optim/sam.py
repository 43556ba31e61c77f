"""SAM and ASAM: sharpness-aware minimisation as a drop-in torch optimizer.

One SAM step climbs to the (first-order) worst point of a ball around θ, takes the gradient
there, comes back to θ and lets a base optimizer step with that gradient::

    ε = ρ · T² g / ‖T g‖,   g = ∇L(θ)          (SAM: T = I;  ASAM: T = diag(|θ| + η))
    θ ← base_step(θ, ∇L(θ + ε))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError, NonFiniteLossError

__all__ = ["SAM", "frozen_norm_stats"]

_NORM_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Leave every normalisation layer's running statistics as they are on exit.

    Wrap SAM's second forward *and backward* pass (at θ + ε) in this, so BatchNorm running
    statistics are updated once per SAM step (by the first forward at θ) and not twice.
    The batch statistics themselves are still used in train mode; only the stored running
    mean, variance and batch counter are saved on entry and restored (in place) on exit,
    which is why the backward pass must run inside (autograd saved those tensors).
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for name in _NORM_STAT_BUFFERS:
                buffer = getattr(module, name, None)
                if buffer is not None:
                    saved.append((buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimisation (SAM) and its adaptive form (ASAM) around a base optimizer.

    The ascent step moves θ to θ + ε with

    .. math:: ε = ρ \, \frac{T^2 g}{\lVert T g \rVert_2}, \qquad g = ∇L(θ),

    T = I for SAM (ε = ρ g/‖g‖, Foret et al. 2021) and T = diag(|θ| + η) elementwise for
    ASAM (Kwon et al. 2021; η = 0 gives the pure scale-invariant form). The norm runs
    over every parameter of every group; ρ, ``adaptive`` and η may differ per group. The
    descent step restores θ exactly and calls the base optimizer with ∇L(θ + ε).

    Parameters
    ----------
    params : iterable of tensors or param-group dicts
        The parameters to optimise (those of ``base_optimizer`` when it is an instance).
    base_optimizer : torch.optim.Optimizer subclass or instance
        A class is built as ``base_optimizer(param_groups, **base_kwargs)``. SAM and the
        base optimizer share one ``param_groups`` list, so a learning-rate scheduler acts on
        either (attach it to ``sam.base_optimizer`` when you call ``first_step``/
        ``second_step`` yourself, so torch sees the base step happen).
    rho : float, optional
        Radius ρ ≥ 0. Default 0.05 for SAM and 2.0 for ASAM (the papers' CIFAR values).
        ρ = 0 makes every step exactly the base optimizer's step.
    adaptive : bool
        ASAM (T = |θ| + η) instead of SAM (T = I).
    eta : float
        ASAM's offset η ≥ 0 (Kwon et al. use 0.01 on weights); ignored by SAM.
    model : nn.Module, optional
        When given, :meth:`step` runs the second forward pass inside
        :func:`frozen_norm_stats`, so BatchNorm statistics are updated once per step.
    **base_kwargs
        Passed to ``base_optimizer`` when it is a class (``lr``, ``momentum``, ...).

    Notes
    -----
    Usage with a closure (it computes the loss, calls ``backward`` and returns the loss;
    SAM zeroes the gradients before each of its two calls)::

        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = sam.step(closure)

    or explicitly (the second forward inside ``frozen_norm_stats``)::

        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)
        with frozen_norm_stats(model):
            loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)

    With ``torch.amp`` gradient scaling, unscale before the ascent step and skip the whole
    step when the scaled gradients overflowed::

        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.unscale_(sam)                              # true gradients at θ
        if sam.first_step(zero_grad=True, skip_nonfinite=True):
            with frozen_norm_stats(model), torch.autocast("cuda"):
                scaler.scale(loss_fn(model(x), y)).backward()
            sam.second_step(zero_grad=True, scaler=scaler)  # scaler.step(base) inside
        else:
            sam.zero_grad()                               # inf/nan: no step at all
        scaler.update()

    A non-finite loss or gradient raises :class:`~ridgeline.errors.NonFiniteLossError`
    before any parameter moves (unless ``skip_nonfinite``); a non-finite loss at θ + ε
    in :meth:`step` restores θ and raises.

    References
    ----------
    Foret, Kleiner, Mobahi & Neyshabur (2021), "Sharpness-Aware Minimization for
    Efficiently Improving Generalization". Kwon, Kim, Park & Choi (2021), "ASAM: Adaptive
    Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks".
    """

    def __init__(self, params: Iterable, base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
                 rho: float | None = None, adaptive: bool = False, *, eta: float = 0.0,
                 model: nn.Module | None = None, **base_kwargs: Any) -> None:
        rho = (2.0 if adaptive else 0.05) if rho is None else float(rho)
        if not math.isfinite(rho) or rho < 0:
            raise ConfigError(f"rho must be a finite number ≥ 0, got {rho}.")
        if not math.isfinite(eta) or eta < 0:
            raise ConfigError(f"eta must be a finite number ≥ 0, got {eta}.")
        defaults = {"rho": rho, "adaptive": bool(adaptive), "eta": float(eta)}
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ConfigError(f"base_optimizer is already built; options {sorted(base_kwargs)} "
                                  "cannot be applied to it. Pass the class instead, or drop them.")
            given = {id(p) for p in _flat_params(params)}
            owned = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if given != owned:
                raise ConfigError(f"params ({len(given)} tensors) are not the parameters of the "
                                  f"given base optimizer ({len(owned)} tensors); pass "
                                  "base_optimizer.param_groups' parameters or the optimizer class.")
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            super().__init__(params, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise ConfigError("base_optimizer must be a torch.optim.Optimizer subclass (e.g. "
                              f"torch.optim.SGD) or instance, got {base_optimizer!r}.")
        self.param_groups = self.base_optimizer.param_groups
        self.model = model
        self._perturbed = False

    # ------------------------------------------------------------------ the two steps
    def _with_grad(self) -> list[tuple[dict, list[torch.Tensor]]]:
        return [(group, [p for p in group["params"] if p.grad is not None])
                for group in self.param_groups]

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """‖T g‖₂ over every parameter with a gradient (T = |θ| + η for adaptive groups)."""
        norms = []
        for group, params in self._with_grad():
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["adaptive"]:
                grads = torch._foreach_mul(grads, _scales(params, group["eta"]))
            norms += torch._foreach_norm(grads)
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, skip_nonfinite: bool = False) -> bool:
        """Ascent: θ ← θ + ε with ε = ρ T² g / ‖T g‖, using the gradients now in ``.grad``.

        Returns True when the parameters moved. A non-finite gradient norm raises
        :class:`NonFiniteLossError` (or returns False with ``skip_nonfinite=True``, the
        mixed-precision pattern) and leaves θ untouched.
        """
        if self._perturbed:
            raise ConfigError("first_step was called twice without second_step; call "
                              "second_step (or restore) before the next ascent.")
        norm = self.grad_norm()
        if not bool(torch.isfinite(norm)):
            if skip_nonfinite:
                return False
            raise NonFiniteLossError(f"the gradient norm at θ is {float(norm)} in SAM's ascent "
                                     "step; no step was taken. Lower the learning rate or check "
                                     "the data (with torch.amp, pass skip_nonfinite=True).")
        for group, params in self._with_grad():
            if not params:
                continue
            for p in params:
                self.state[p]["theta"] = p.detach().clone()
            if group["rho"] == 0:
                continue
            scale = group["rho"] / (norm.to(params[0].device) + 1e-12)
            grads = [p.grad for p in params]
            if group["adaptive"]:
                squares = _scales(params, group["eta"])
                torch._foreach_mul_(squares, squares)
                eps = torch._foreach_mul(grads, squares)
                torch._foreach_mul_(eps, scale)
            else:
                eps = torch._foreach_mul(grads, scale)
            torch._foreach_add_(params, eps)
        self._perturbed = True
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put θ back exactly as it was before :meth:`first_step` (no optimizer step)."""
        for group in self.param_groups:
            for p in group["params"]:
                theta = self.state[p].pop("theta", None) if p in self.state else None
                if theta is not None:
                    p.copy_(theta)
        self._perturbed = False

    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Descent: restore θ, then step the base optimizer with the gradients at θ + ε.

        With a ``torch.amp.GradScaler`` the base step is ``scaler.step(base_optimizer)``
        (it unscales, and skips the step if the gradients overflowed); call
        ``scaler.update()`` afterwards as usual.
        """
        self.restore()
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One full SAM step. ``closure`` computes the loss, calls ``backward`` and returns
        the loss; it is called at θ and at θ + ε (gradients are zeroed before each call).
        Returns the loss at θ."""
        if closure is None:
            raise ConfigError("SAM.step needs a closure that computes the loss and calls "
                              "backward (it runs twice); or call first_step/second_step.")
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            raise NonFiniteLossError(f"the loss at θ is {_value(loss)} in SAM's ascent step; no "
                                     "step was taken. Lower the learning rate or check the data.")
        self.first_step(zero_grad=True)
        with torch.enable_grad(), (frozen_norm_stats(self.model) if self.model is not None
                                   else contextlib.nullcontext()):
            perturbed_loss = closure()
        if perturbed_loss is not None and not bool(torch.isfinite(torch.as_tensor(perturbed_loss)).all()):
            self.restore()
            self.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the loss at θ + ε is {_value(perturbed_loss)} in SAM's step; "
                                     "θ was restored and no step was taken. Lower rho or the "
                                     "learning rate.")
        self.second_step()
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its param groups carry ρ, adaptive, η)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)
        self.param_groups = self.base_optimizer.param_groups

    def __repr__(self) -> str:
        group = self.param_groups[0]
        kind = "ASAM" if group["adaptive"] else "SAM"
        return f"{kind}(rho={group['rho']}, base={self.base_optimizer!r})"


def _value(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _scales(params: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
    """T = |θ| + η for each tensor."""
    scales = torch._foreach_abs(params)
    if eta:
        torch._foreach_add_(scales, eta)
    return scales


def _flat_params(params: Iterable) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            value = item["params"]
            out += [value] if isinstance(value, torch.Tensor) else list(value)
        else:
            out.append(item)
    return out
