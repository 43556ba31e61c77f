"""JSON conversion shared by instruments and the study layer (below both in the layering)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy arrays and scalars → lists and floats; NaN/inf → None."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_jsonable(value.item() if value.dim() == 0 else value.tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if isinstance(value, Path):
        return str(value)
    return value
