"""Adaptive sharpness: worst-case and average-case loss increase in a (scaled) ball.

Andriushchenko et al. (2023), "A modern look at the relationship between sharpness and
generalization"; Kwon et al. (2021), "ASAM".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ridgeline.curvature.operators import ParamFilter, _mode_notes, select_parameters
from ridgeline.errors import ConfigError
from ridgeline.objective import Objective, as_objective
from ridgeline.params import Params, make_generator
from ridgeline.progress import progress_bar

__all__ = ["SharpnessResult", "sharpness"]


@dataclass(frozen=True)
class SharpnessResult:
    """S = L(θ + δ) − L(θ) for the worst δ found, or averaged over random δ.

    Attributes
    ----------
    value : float
        The sharpness.
    stderr : float
        Standard error over the samples (average case; 0 for worst case).
    kind : {"worst", "average"}
    rho : float
    adaptive : bool
    norm : {"2", "inf"}
    loss : float
        L(θ), the unperturbed loss.
    perturbed_loss : float
        L(θ + δ) (worst case) or its mean over samples (average case).
    evaluations : int
        Loss (and gradient) evaluations over the dataset.
    history : tuple of float
        Worst case: the loss increase after each ascent step; average case: each sample's.
    mode, notes
    """

    value: float
    stderr: float
    kind: str
    rho: float
    adaptive: bool
    norm: str
    loss: float
    perturbed_loss: float
    evaluations: int
    history: tuple[float, ...] = field(default=(), repr=False)
    mode: str = "eval"
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "kind": self.kind, "rho": self.rho,
                "adaptive": self.adaptive, "norm": self.norm, "loss": self.loss,
                "perturbed_loss": self.perturbed_loss, "evaluations": self.evaluations,
                "history": list(self.history), "mode": self.mode, "notes": list(self.notes)}

    def plot(self, ax=None):
        """Loss increase per ascent step (worst) or per sample (average); returns the Axes."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(5, 3.5)
        steps = np.arange(1, len(self.history) + 1)
        if self.kind == "worst":
            ax.plot(steps, self.history, "o-", ms=3)
            ax.set_xlabel("ascent step")
        else:
            ax.plot(steps, self.history, "o", ms=3)
            ax.axhline(self.value, color="k", lw=0.8)
            ax.set_xlabel("sample")
        ax.set_ylabel("L(θ+δ) − L(θ)")
        ax.set_title(f"{self.kind}-case {'adaptive ' if self.adaptive else ''}"
                     f"ℓ{'∞' if self.norm == 'inf' else '2'} sharpness, ρ={self.rho:g}")
        return ax


def _norm_name(norm: Any) -> str:
    if norm in (2, 2.0, "2", "l2"):
        return "2"
    if norm in ("inf", "linf", math.inf) or (isinstance(norm, float) and math.isinf(norm)):
        return "inf"
    raise ConfigError(f"norm must be 2 or 'inf', got {norm!r}.")


def _total_norm(tensors: Params) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in tensors.values()))


def _project(gamma: Params, rho: float, norm: str) -> Params:
    """Onto {‖γ‖_p ≤ ρ}: rescale (p = 2) or clip (p = ∞)."""
    if norm == "inf":
        return {k: t.clamp(-rho, rho) for k, t in gamma.items()}
    total = float(_total_norm(gamma))
    return gamma if total <= rho else {k: t * (rho / total) for k, t in gamma.items()}


def _worst_case(objective: Objective, theta: Params, fixed: Params, scale: Params, rho: float,
                norm: str, steps: int, gen: torch.Generator, progress: bool | None):
    """Projected (sign-)gradient ascent on γ, δ = scale ⊙ γ, ‖γ‖_p ≤ ρ.

    Step size 2ρ, halved at the checkpoints of Auto-PGD (Croce & Hein 2020) when fewer
    than 75 % of the steps since the last checkpoint improved the best loss, restarting
    from the best point; the best loss found is returned."""

    calls = [0]

    def at(gamma: Params):
        calls[0] += 1
        point = {**fixed, **{k: theta[k] + scale[k] * gamma[k] for k in theta}}
        value, g = objective.loss_and_grad(point)
        return float(value), {k: g[k] * scale[k] for k in theta}  # ∇_γ L = scale ⊙ ∇_δ L

    if norm == "inf":
        gamma = {k: (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(t) * rho
                 for k, t in theta.items()}
    else:
        draws = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
                 for k, t in theta.items()}
        gamma = {k: t * (rho / float(_total_norm(draws))) for k, t in draws.items()}
    checkpoints, p_prev, p_now = set(), 0.0, 0.22
    while p_now < 1:
        checkpoints.add(math.ceil(p_now * steps))
        p_prev, p_now = p_now, p_now + max(p_now - p_prev - 0.03, 0.06)
    loss, direction = at(gamma)
    best_loss, best_gamma = loss, gamma
    step, last_check, improved, best_at_check, step_at_check = 2 * rho, 0, 0, best_loss, 2 * rho
    history = []
    with progress_bar(steps, "sharpness (worst case)", progress) as bar:
        for i in range(1, steps + 1):
            if norm == "inf":
                moved = {k: gamma[k] + step * direction[k].sign() for k in gamma}
            else:
                size = float(_total_norm(direction))
                moved = {k: gamma[k] + step * direction[k] / max(size, 1e-30) for k in gamma}
            gamma = _project(moved, rho, norm)
            loss, direction = at(gamma)
            if loss > best_loss:
                best_loss, best_gamma, improved = loss, gamma, improved + 1
            history.append(best_loss)
            bar.advance()
            if i in checkpoints:
                stalled = improved < 0.75 * (i - last_check)
                flat = step == step_at_check and best_loss == best_at_check
                step_at_check, best_at_check, last_check, improved = step, best_loss, i, 0
                if stalled or flat:
                    step /= 2
                    gamma = best_gamma
                    loss, direction = at(gamma)
    return best_loss, history, calls[0]


def sharpness(model_or_objective: nn.Module | Objective, data: Any = None, *,
              kind: str = "worst", rho: float, adaptive: bool = True, norm: int | str = 2,
              steps: int = 20, samples: int = 20, seed: int | torch.Generator | None = 0,
              loss: str | Callable = "cross_entropy", param_filter: ParamFilter = None,
              progress: bool | None = False, **objective_options: Any) -> SharpnessResult:
    """Worst-case or average-case (adaptive) sharpness of the loss at θ.

    With scale T = |θ| (``adaptive=True``, elementwise) or T = 1:

    * worst case  S_max = max_{‖δ ⊘ T‖_p ≤ ρ} L(θ + δ) − L(θ), by projected gradient
      ascent on γ = δ ⊘ T (normalised gradient steps for p = 2, sign steps for p = ∞),
      ``steps`` steps of size 2ρ halved on stagnation (Auto-PGD schedule), from a random
      start in the ball; the largest loss seen is kept, so S_max is a lower bound of the
      true maximum;
    * average case  S_avg = E_δ L(θ + δ) − L(θ), δ = ρ T ⊙ ε with ε ~ N(0, I) (p = 2) or
      ε ~ U[−1, 1] (p = ∞), estimated from ``samples`` draws with its standard error. For a
      quadratic loss S_avg = ½ρ² Σ_i H_ii T_i² (p = 2).

    Adaptive sharpness is invariant to rescaling of layers (Kwon et al. 2021). Parameters
    with θ_i = 0 are not perturbed in adaptive mode.

    Parameters
    ----------
    model_or_objective : nn.Module or Objective
    data : (inputs, targets), Dataset or DataLoader
    kind : {"worst", "average"}
    rho : float
        Radius (relative to |θ| when adaptive). Andriushchenko et al. use e.g. ρ ≈ 0.0005–
        0.002 for worst-case ℓ∞ and ρ ≈ 0.05–0.4 for average-case ℓ2.
    adaptive : bool
    norm : {2, "inf"}
    steps : int
        Ascent steps (worst case).
    samples : int
        Random perturbations (average case).
    seed : int, torch.Generator or None
    loss : {"cross_entropy", "mse"} or callable
    param_filter : perturb only some parameters (see :func:`~ridgeline.curvature.hessian`)
    progress : bool

    Returns
    -------
    SharpnessResult

    References
    ----------
    Keskar et al. (2017); Kwon, Kim, Park & Choi (2021), "ASAM: Adaptive sharpness-aware
    minimization"; Andriushchenko, Croce, Müller, Hein & Flammarion (2023), "A modern look
    at the relationship between sharpness and generalization"; Croce & Hein (2020) (APGD).
    """
    if kind not in ("worst", "average"):
        raise ConfigError(f"kind must be 'worst' or 'average', got {kind!r}.")
    norm = _norm_name(norm)
    if not rho > 0:
        raise ConfigError(f"rho must be positive, got {rho}.")
    if steps < 1 or samples < 2:
        raise ConfigError(f"steps must be ≥ 1 and samples ≥ 2; got steps={steps}, samples={samples}.")
    objective = as_objective(model_or_objective, data, loss=loss, **objective_options)
    notes = _mode_notes(objective)
    every = objective.params()
    names = select_parameters(every, param_filter)
    theta = {n: every[n].clone() for n in names}
    fixed = {n: t for n, t in every.items() if n not in theta}
    scale = {n: (t.abs() if adaptive else torch.ones_like(t)) for n, t in theta.items()}
    gen = make_generator(seed)
    base = float(objective.loss({**fixed, **theta}))
    if kind == "worst":
        worst, history, calls = _worst_case(objective, theta, fixed, scale, rho, norm, steps, gen, progress)
        increases = [h - base for h in history]
        return SharpnessResult(value=worst - base, stderr=0.0, kind=kind, rho=rho,
                               adaptive=adaptive, norm=norm, loss=base, perturbed_loss=worst,
                               evaluations=1 + calls,
                               history=tuple(increases), mode="train" if objective.train_mode
                               else "eval", notes=notes)
    losses = []
    with progress_bar(samples, "sharpness (average case)", progress) as bar:
        for _ in range(samples):
            if norm == "2":
                eps = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
                       for k, t in theta.items()}
            else:
                eps = {k: (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(t)
                       for k, t in theta.items()}
            point = {**fixed, **{k: theta[k] + rho * scale[k] * eps[k] for k in theta}}
            losses.append(float(objective.loss(point)))
            bar.advance()
    increases = [value - base for value in losses]
    return SharpnessResult(value=float(np.mean(increases)),
                           stderr=float(np.std(increases, ddof=1) / math.sqrt(samples)),
                           kind=kind, rho=rho, adaptive=adaptive, norm=norm, loss=base,
                           perturbed_loss=float(np.mean(losses)), evaluations=1 + samples,
                           history=tuple(increases),
                           mode="train" if objective.train_mode else "eval", notes=notes)
