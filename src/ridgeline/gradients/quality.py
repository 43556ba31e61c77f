"""How good is a guess: cosine between the forward-gradient estimate and the true gradient."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ridgeline.errors import ConfigError
from ridgeline.gradients.forward import check_num_guesses, forward_gradient, layer_of
from ridgeline.gradients.guesses import generator_for
from ridgeline.gradients.resolve import resolve_guess
from ridgeline.objective import as_objective

__all__ = ["GuessQuality", "quality", "expected_random_cosine"]


def expected_random_cosine(num_params: int) -> float:
    """E|cos(v, g)| for v ~ N(0, I_P): Γ(P/2) / (√π Γ((P+1)/2)) ≈ √(2/(πP)).

    cos² ~ Beta(1/2, (P−1)/2), whose square root has this mean; the estimate d·v of a
    single random guess is parallel to ±v with the sign of d, so this is also
    E[cos(ĝ, g)].
    """
    p = float(num_params)
    return math.exp(math.lgamma(p / 2) - math.lgamma((p + 1) / 2)) / math.sqrt(math.pi)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


@dataclass(frozen=True)
class GuessQuality:
    """Cosine similarity between forward-gradient estimates ĝ and the backprop gradient g.

    Attributes
    ----------
    guess : str
    cosine : tensor (R,)
        cos(ĝ, g) over all parameters, one value per repeat (independent guesses).
    per_layer : dict layer -> tensor (R,)
        cos(ĝ_ℓ, g_ℓ) per layer (a module's weight and bias together).
    norm_ratio : tensor (R,)
        ‖ĝ‖ / ‖g‖.
    num_params : int
        P.
    layer_sizes : dict layer -> int
    num_guesses, combine : as passed
    details : dict
        What the guess reports about itself (e.g. the local heads' FLOP ratio).
    """

    guess: str
    cosine: torch.Tensor
    per_layer: dict[str, torch.Tensor]
    norm_ratio: torch.Tensor
    num_params: int
    layer_sizes: dict[str, int]
    num_guesses: int = 1
    combine: str = "mean"
    details: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(self.cosine.mean())

    @property
    def std(self) -> float:
        return float(self.cosine.std()) if self.cosine.numel() > 1 else 0.0

    @property
    def random_baseline(self) -> float:
        """1/√P, the scale of the cosine of one random guess."""
        return 1.0 / math.sqrt(self.num_params)

    @property
    def expected_random(self) -> float:
        """E[cos] of one Gaussian guess, Γ(P/2)/(√π Γ((P+1)/2))."""
        return expected_random_cosine(self.num_params)

    def to_dict(self) -> dict:
        return {"guess": self.guess, "num_guesses": self.num_guesses, "combine": self.combine,
                "repeats": int(self.cosine.numel()), "num_params": self.num_params,
                "cosine": self.cosine.tolist(), "mean": self.mean, "std": self.std,
                "random_baseline": self.random_baseline,
                "expected_random": self.expected_random,
                "ratio_to_baseline": self.mean / self.random_baseline,
                "norm_ratio": float(self.norm_ratio.mean()),
                "per_layer": {k: {"mean": float(v.mean()),
                                  "std": float(v.std()) if v.numel() > 1 else 0.0,
                                  "size": self.layer_sizes[k]} for k, v in self.per_layer.items()},
                "details": self.details}

    def plot(self, ax=None):
        """Mean cosine per layer (± std) with the overall mean and 1/√P; returns the Axes."""
        from ridgeline.plotting import new_axes

        ax = new_axes(ax, 5, 3.2)
        layers = list(self.per_layer)
        means = [float(self.per_layer[k].mean()) for k in layers]
        stds = [float(self.per_layer[k].std()) if self.per_layer[k].numel() > 1 else 0.0
                for k in layers]
        ax.bar(range(len(layers)), means, yerr=stds, capsize=3, label="per layer")
        ax.axhline(self.mean, color="C1", label=f"overall {self.mean:.3g}")
        ax.axhline(self.random_baseline, color="C2", ls=":", label="1/√P")
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
        ax.set_ylabel("cos(ĝ, g)")
        ax.set_title(f"guess: {self.guess}")
        ax.legend(fontsize=8)
        return ax


@contextlib.contextmanager
def _frozen_heads(strategy: Any):
    """Keep a LocalGuess's heads fixed while measuring (no training side effect)."""
    flag = getattr(strategy, "train_heads", None)
    if flag is not None:
        strategy.train_heads = False
    try:
        yield
    finally:
        if flag is not None:
            strategy.train_heads = flag


def quality(model_or_objective: Any, data: Any = None, *, guess: Any = "random",
            repeats: int = 10, num_guesses: int = 1, combine: str = "mean",
            seed: int | torch.Generator | None = 0, loss: Any = "cross_entropy",
            chunk_size: int | None = None, fit_epochs: int = 5) -> GuessQuality:
    """cos(ĝ, g) between forward-gradient estimates and the backprop gradient, overall and
    per layer, over ``repeats`` independent guesses.

    For one random Gaussian guess, E[cos] = Γ(P/2)/(√π Γ((P+1)/2)) ≈ 0.8/√P: forward
    gradients from random directions are almost orthogonal to the gradient in large
    models, which is what informed guesses (``"local"``) are for.

    Parameters
    ----------
    model_or_objective, data, loss : as in :func:`forward_gradient`
    guess : as in :func:`forward_gradient`
        ``"local"`` fits the auxiliary heads of a new :class:`LocalGuess` for
        ``fit_epochs`` epochs with the network frozen; the heads stay fixed while measuring.
    repeats : int
        Independent estimates (a deterministic guess, such as ``"local"`` or a tensor, is
        evaluated once).
    num_guesses, combine, seed, chunk_size : as in :func:`forward_gradient`
    fit_epochs : int

    Returns
    -------
    GuessQuality

    References
    ----------
    Fournier et al. (2023), "Can forward gradient match backpropagation?", §4 (alignment of
    guesses with the gradient).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer ≥ 1, got {repeats!r}.")
    check_num_guesses(num_guesses)
    objective = as_objective(model_or_objective, data, loss=loss)
    params = objective.params()
    if guess == "local":
        from ridgeline.gradients.local import LocalGuess

        strategy: Any = LocalGuess(objective.model, loss=objective.loss_fn,
                                   train_mode=objective.train_mode).fit(
            objective, epochs=fit_epochs, seed=seed if isinstance(seed, int) else 0)
    else:
        strategy = resolve_guess(guess, objective)
    true_grad = objective.grad()
    g = torch.cat([true_grad[k].reshape(-1) for k in params])
    layers: dict[str, list[str]] = {}
    for name in params:
        layers.setdefault(layer_of(name), []).append(name)
    gen = generator_for(seed, params)
    runs = repeats if strategy.stochastic else 1
    overall, ratios, per_layer = [], [], {k: [] for k in layers}
    with _frozen_heads(strategy):
        for _ in range(runs):
            est = forward_gradient(objective, guess=strategy, num_guesses=num_guesses,
                                   combine=combine, seed=gen, chunk_size=chunk_size).estimate
            flat = torch.cat([est[k].reshape(-1) for k in params])
            overall.append(_cosine(flat, g))
            ratios.append(float(flat.norm() / g.norm()) if float(g.norm()) > 0 else math.nan)
            for layer, names in layers.items():
                a = torch.cat([est[k].reshape(-1) for k in names])
                b = torch.cat([true_grad[k].reshape(-1) for k in names])
                per_layer[layer].append(_cosine(a, b))
    name = guess if isinstance(guess, str) else getattr(strategy, "name", "custom")
    return GuessQuality(
        guess=name, cosine=torch.tensor(overall, dtype=torch.float64),
        per_layer={k: torch.tensor(v, dtype=torch.float64) for k, v in per_layer.items()},
        norm_ratio=torch.tensor(ratios, dtype=torch.float64),
        num_params=int(g.numel()),
        layer_sizes={k: sum(params[n].numel() for n in names) for k, names in layers.items()},
        num_guesses=num_guesses, combine=combine, details=strategy.describe())
