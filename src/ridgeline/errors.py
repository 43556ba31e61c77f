"""Errors raised by ridgeline.

Every error is a :class:`RidgelineError`. Messages say what is wrong, with names and
numbers, and what to do about it. User mistakes never surface as bare ``assert``.
"""

from __future__ import annotations

__all__ = [
    "RidgelineError",
    "ShapeMismatchError",
    "ArchitectureMismatchError",
    "NonFiniteLossError",
    "MemoryBudgetError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "ConvergenceWarning",
    "UnsupportedOperationError",
    "DistributedError",
    "RunInUseError",
]


class RidgelineError(Exception):
    """Base class of every error ridgeline raises on purpose."""


class ShapeMismatchError(RidgelineError, ValueError):
    """Tensors, data or directions have shapes that do not fit together."""


class ArchitectureMismatchError(RidgelineError, ValueError):
    """Two models (or a model and a checkpoint) do not share one architecture."""


class NonFiniteLossError(RidgelineError, FloatingPointError):
    """A loss evaluated to NaN or infinity."""


class MemoryBudgetError(RidgelineError, MemoryError):
    """A request would exceed the memory budget; the message names a size that fits."""


class DataError(RidgelineError, ValueError):
    """Data is missing, malformed, non-finite, or its labels are out of range."""


class ConfigError(RidgelineError, ValueError):
    """A configuration, option or argument value is not valid."""


class CheckpointError(RidgelineError, OSError):
    """A checkpoint is missing, unreadable, or was not written by ridgeline."""


class UnsupportedOperationError(RidgelineError, NotImplementedError):
    """The model uses an operation the requested transform cannot handle."""


class DistributedError(RidgelineError, RuntimeError):
    """Processes of a distributed run disagree, or no process group is initialised."""


class RunInUseError(RidgelineError, RuntimeError):
    """A study's run folder is locked by another run that is still going."""


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before meeting its tolerance."""
