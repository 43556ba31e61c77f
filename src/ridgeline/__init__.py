"""ridgeline: measure the geometry of neural-network training in PyTorch.

The public API. Core objects are imported eagerly; the instrument packages
(``ridgeline.connectivity``, ``ridgeline.curvature``, ``ridgeline.kernels``,
``ridgeline.gradients``, ``ridgeline.transport``, ``ridgeline.subspace``,
``ridgeline.merge``, ``ridgeline.optim``, ``ridgeline.study``) are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from ridgeline import errors
from ridgeline._version import __version__
from ridgeline.checkpoints import load, save
from ridgeline.objective import Objective, as_objective
from ridgeline.params import (
    flatten,
    random_direction,
    unflatten,
)
from ridgeline.train import TrainResult, train

_SUBPACKAGES = (
    "checkpoints",
    "connectivity",
    "curvature",
    "data",
    "distributed",
    "gradients",
    "kernels",
    "linalg",
    "merge",
    "models",
    "optim",
    "params",
    "study",
    "subspace",
    "transport",
)

__all__ = [
    "__version__",
    "errors",
    "Objective",
    "as_objective",
    "flatten",
    "unflatten",
    "random_direction",
    "train",
    "TrainResult",
    "save",
    "load",
    *_SUBPACKAGES,
]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"ridgeline.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ridgeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
