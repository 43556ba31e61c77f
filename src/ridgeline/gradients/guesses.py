"""Guess directions for forward gradients: random, previous estimate, user-given.

A *guess* supplies the directions u_1 … u_K along which the directional derivative
∇L·u_k is taken (Baydin et al. 2022; Fournier et al. 2023). Every guess strategy is a
:class:`Guess`: called with the objective and the current parameters it returns a
:class:`GuessBatch`, the K directions stacked along a leading axis, how each one is turned
into an estimate (unbiased ``d·v`` for random draws, projection ``d/‖u‖²·u`` for informed
guesses), and optionally a partition of the parameters into blocks, each of which is
estimated on its own (its own directional derivatives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ridgeline.errors import ArchitectureMismatchError, ConfigError, ShapeMismatchError
from ridgeline.params import Params, make_generator

__all__ = ["Guess", "GuessBatch", "RandomGuess", "PreviousGuess", "TensorGuess",
           "CallableGuess", "GUESS_NAMES"]

#: names accepted by ``guess=`` (besides a :class:`Guess`, a callable or a dict of tensors)
GUESS_NAMES = ("random", "rademacher", "local", "previous")


@dataclass(frozen=True)
class GuessBatch:
    """K guess directions and how to turn each into a gradient estimate.

    Attributes
    ----------
    directions : dict name -> tensor (K, *shape)
        The directions u_k, stacked along a leading axis, shaped like the parameters.
    unbiased : tensor (K,) of bool
        ``True`` for a random direction with E[v vᵀ] = I, estimated as ĝ = (∇L·v) v
        (unbiased); ``False`` for an informed guess, estimated as the projection
        ĝ = (∇L·u / ‖u‖²) u.
    blocks : tuple of tuples of names, optional
        A partition of the parameter names. Each block gets its own directional
        derivatives (the tangent is u_k restricted to the block) and its own estimate;
        ``None`` means one block holding every parameter.
    """

    directions: Params
    unbiased: torch.Tensor
    blocks: tuple[tuple[str, ...], ...] | None = None

    @property
    def num_guesses(self) -> int:
        return int(self.unbiased.shape[0])


class Guess:
    """A strategy that proposes guess directions; subclass and implement ``__call__``.

    ``stochastic`` says whether two calls at the same parameters can differ (repeating a
    deterministic guess gives the same estimate). :meth:`observe` receives every estimate
    made with the guess (used by :class:`PreviousGuess` and to train the auxiliary heads
    of :class:`~ridgeline.gradients.LocalGuess`).
    """

    name: str = "guess"
    stochastic: bool = True

    def __call__(self, objective: Any, params: Params, *, num_guesses: int,
                 generator: torch.Generator) -> GuessBatch:
        raise NotImplementedError

    def observe(self, estimate: Params) -> None:
        """Called with each estimate built from this guess."""

    def describe(self) -> dict:
        return {"guess": self.name}


def _draw(kind: str, shape: tuple[int, ...], like: torch.Tensor,
          generator: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    signs = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * signs - 1).to(like.dtype)


def random_directions(params: Mapping[str, torch.Tensor], num_guesses: int, *,
                      kind: str = "gaussian", generator: torch.Generator) -> Params:
    """K i.i.d. directions with E[v vᵀ] = I: standard normal or Rademacher (±1)."""
    return {name: _draw(kind, (num_guesses, *t.shape), t, generator) for name, t in params.items()}


class RandomGuess(Guess):
    """v ~ N(0, I) (``kind="gaussian"``) or Rademacher ±1 entries; ĝ = (∇L·v) v is unbiased.

    With ``blocks`` (a partition of the parameter names) every block is perturbed on its
    own, one directional derivative per block and guess, which lowers the variance
    (Ren et al. 2023, "Scaling forward gradient with local losses").

    References
    ----------
    Baydin, Pearlmutter, Syme, Wood & Torr (2022), "Gradients without backpropagation".
    """

    stochastic = True

    def __init__(self, kind: str = "gaussian", *,
                 blocks: Sequence[Sequence[str]] | None = None) -> None:
        if kind not in ("gaussian", "rademacher"):
            raise ConfigError(f"random guesses are 'gaussian' or 'rademacher', got {kind!r}.")
        self.kind = kind
        self.name = "random" if kind == "gaussian" else "rademacher"
        self.blocks = None if blocks is None else tuple(tuple(b) for b in blocks)

    def __call__(self, objective, params, *, num_guesses, generator):
        directions = random_directions(params, num_guesses, kind=self.kind, generator=generator)
        first = next(iter(params.values()))
        return GuessBatch(directions, torch.ones(num_guesses, dtype=torch.bool,
                                                 device=first.device), self.blocks)


class PreviousGuess(Guess):
    """The previous estimate as the first guess, fresh Gaussian directions for the rest.

    The first call (no estimate yet) draws only random directions. Best combined with
    ``combine="span"``: the estimate is then the projection of ∇L on span(ĝ_prev, v_2,
    …, v_K), which accumulates gradient information from step to step when the gradient
    changes slowly (as during training with a small learning rate).
    """

    name = "previous"
    stochastic = True

    def __init__(self) -> None:
        self.previous: Params | None = None

    def __call__(self, objective, params, *, num_guesses, generator):
        first = next(iter(params.values()))
        if self.previous is None:
            directions = random_directions(params, num_guesses, generator=generator)
            return GuessBatch(directions, torch.ones(num_guesses, dtype=torch.bool,
                                                     device=first.device))
        fresh = random_directions(params, num_guesses - 1, generator=generator)
        directions = {k: torch.cat([self.previous[k][None], fresh[k]]) for k in params}
        unbiased = torch.ones(num_guesses, dtype=torch.bool, device=first.device)
        unbiased[0] = False
        return GuessBatch(directions, unbiased)

    def observe(self, estimate: Params) -> None:
        self.previous = {k: v.detach().clone() for k, v in estimate.items()}


def stack_guess(guess: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> Params:
    """Check a user guess against the parameters; return it with a leading K axis."""
    missing = [k for k in params if k not in guess]
    extra = [k for k in guess if k not in params]
    if missing or extra:
        parts = ([f"missing {missing[:5]}"] if missing else []) + (
            [f"unknown {extra[:5]}"] if extra else [])
        raise ArchitectureMismatchError(
            f"the guess does not name the model's parameters: {'; '.join(parts)}. Give one "
            "tensor per parameter, keyed like model.named_parameters().")
    leading = None
    out = {}
    for name, p in params.items():
        u = torch.as_tensor(guess[name])
        if tuple(u.shape) == tuple(p.shape):
            u, k = u[None], 1
        elif u.dim() == p.dim() + 1 and tuple(u.shape[1:]) == tuple(p.shape):
            k = int(u.shape[0])
        else:
            raise ShapeMismatchError(
                f"guess '{name}' has shape {tuple(u.shape)} but the parameter has shape "
                f"{tuple(p.shape)}; pass a tensor of shape {tuple(p.shape)} (one guess) or "
                f"(K, {', '.join(map(str, p.shape))}) for K guesses.")
        if leading is not None and k != leading:
            raise ShapeMismatchError(
                f"guess '{name}' holds {k} directions but earlier tensors hold {leading}; "
                "every tensor needs the same leading number of guesses K.")
        leading = k
        out[name] = u.to(device=p.device, dtype=p.dtype)
    if leading == 0:
        raise ShapeMismatchError("the guess holds 0 directions; give at least one.")
    return out


class TensorGuess(Guess):
    """Fixed informed guesses: a dict of tensors shaped like the parameters, optionally
    with a leading axis of K directions. Estimated by projection, ĝ = (∇L·u/‖u‖²) u."""

    name = "tensor"
    stochastic = False

    def __init__(self, guess: Mapping[str, torch.Tensor]) -> None:
        self.guess = dict(guess)

    def __call__(self, objective, params, *, num_guesses, generator):
        directions = stack_guess(self.guess, params)
        k = next(iter(directions.values())).shape[0]
        return GuessBatch(directions, torch.zeros(k, dtype=torch.bool))


class CallableGuess(Guess):
    """A user function ``fn(objective, params) -> dict of tensors`` (one direction shaped
    like the parameters, or K stacked along a leading axis), treated as an informed guess."""

    stochastic = True

    def __init__(self, fn: Callable[[Any, Params], Mapping[str, torch.Tensor]]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def __call__(self, objective, params, *, num_guesses, generator):
        result = self.fn(objective, params)
        if not isinstance(result, Mapping):
            raise ShapeMismatchError(
                f"the guess function {self.name!r} returned {type(result).__name__}; it must "
                "return a dict of tensors keyed like model.named_parameters().")
        return TensorGuess(result)(objective, params, num_guesses=num_guesses, generator=generator)


def generator_for(seed: int | torch.Generator | None, params: Mapping[str, torch.Tensor]
                  ) -> torch.Generator:
    """A generator on the parameters' device."""
    first = next(iter(params.values()))
    return make_generator(seed, first.device)
