"""Turn what a user passes as a guess (a name, a Guess, a dict, a callable) into a :class:`Guess`.

Kept apart from ``guesses.py`` and ``local.py`` so that neither imports the other's module
in a circle: ``local`` builds on ``guesses``; this module builds on both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ridgeline.errors import ConfigError
from ridgeline.gradients.guesses import (
    GUESS_NAMES,
    CallableGuess,
    Guess,
    PreviousGuess,
    RandomGuess,
    TensorGuess,
)
from ridgeline.gradients.local import LocalGuess

__all__ = ["resolve_guess"]


def resolve_guess(guess: Any, objective: Any) -> Guess:
    """A :class:`Guess` from a name, a Guess, a callable, or a dict of tensors."""
    if isinstance(guess, Guess):
        return guess
    if isinstance(guess, str):
        if guess == "random":
            return RandomGuess("gaussian")
        if guess == "rademacher":
            return RandomGuess("rademacher")
        if guess == "previous":
            return PreviousGuess()
        if guess == "local":
            return LocalGuess(objective.model, loss=objective.loss_fn,
                              train_mode=objective.train_mode).fit(objective)
        raise ConfigError(f"unknown guess {guess!r}; use one of {list(GUESS_NAMES)}, a "
                          "LocalGuess, a dict of tensors, or a callable (objective, params) -> dict.")
    if isinstance(guess, Mapping):
        return TensorGuess(guess)
    if callable(guess):
        return CallableGuess(guess)
    raise ConfigError(f"guess must be a name {list(GUESS_NAMES)}, a Guess, a dict of tensors or "
                      f"a callable; got {type(guess).__name__}.")
