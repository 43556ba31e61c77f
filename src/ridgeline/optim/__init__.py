"""Sharpness-aware training: SAM, ASAM, SAF and MESA (and the forward-gradient optimizer).

Importing this package registers the training methods ``"sam"``, ``"asam"``, ``"saf"`` and
``"mesa"`` with :func:`ridgeline.train`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ridgeline.optim import methods  # noqa: F401 - registers the training methods
from ridgeline.optim.data import IndexedDataset
from ridgeline.optim.mesa import EMATeacherLoss
from ridgeline.optim.saf import TrajectoryLoss
from ridgeline.optim.sam import SAM, frozen_norm_stats

__all__ = ["SAM", "TrajectoryLoss", "EMATeacherLoss", "IndexedDataset", "frozen_norm_stats",
           "ForwardGradientSGD"]

_LAZY = {"ForwardGradientSGD": "ridgeline.gradients.training"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ridgeline.optim' has no attribute {name!r}")
