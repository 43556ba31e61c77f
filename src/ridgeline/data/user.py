"""Data from user code: ``"package.module:callable"`` called with ``split=`` and arguments."""

from __future__ import annotations

from typing import Any

import torch

from ridgeline.data.dataset import Dataset
from ridgeline.errors import DataError

__all__ = ["load_user_data", "as_dataset"]


def load_user_data(spec: str, split: str = "train", **kwargs: Any) -> Dataset:
    """Call the user's data function ``spec`` as ``fn(split=split, **kwargs)``.

    It may return a ridgeline :class:`Dataset`, an ``(inputs, targets)`` pair (tensors or
    NumPy arrays), a ``torch.utils.data.Dataset`` of ``(input, target)`` examples, or a
    ``DataLoader`` of ``(inputs, targets)`` batches; see :func:`as_dataset`.
    """
    from ridgeline.usercode import call_user, resolve_callable

    fn = resolve_callable(spec, "data function")
    data = call_user(fn, spec, "data function", split=split, **kwargs)
    return as_dataset(data, name=spec.rpartition(":")[2], source=f"data function {spec!r} "
                      f"(split={split!r})")


def _tensor(value: Any, what: str, source: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise DataError(f"{source} returned {what} of dtype {value.dtype}; use numbers.")
            return torch.from_numpy(np.ascontiguousarray(value))
    except ImportError:  # pragma: no cover
        pass
    raise DataError(f"{source} returned {what} of type {type(value).__name__}; use tensors or "
                    "NumPy arrays.")


def _from_batches(batches: Any, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{source}: each batch must be (inputs, targets, ...); got "
                            f"{type(item).__name__}.")
        xs.append(_tensor(item[0], "batch inputs", source))
        ys.append(_tensor(item[1], "batch targets", source))
    if not xs:
        raise DataError(f"{source} returned a loader with no batches.")
    try:
        return torch.cat(xs), torch.cat(ys)
    except RuntimeError as exc:
        raise DataError(f"{source}: its batches do not stack into one tensor ({exc}); every "
                        "example needs the same shape.") from exc


def as_dataset(data: Any, *, name: str = "data", source: str = "data") -> Dataset:
    """A ridgeline :class:`Dataset` held in memory from what user code returned.

    - a ridgeline ``Dataset`` is kept as it is;
    - an ``(inputs, targets)`` pair of tensors or arrays;
    - a ``torch.utils.data.DataLoader`` (or any iterable of ``(inputs, targets)`` batches):
      every batch is read once and concatenated;
    - a ``torch.utils.data.Dataset`` of ``(input, target)`` examples (``TensorDataset``
      included): read in order through a ``DataLoader`` of 256 examples.

    Integer targets are class labels (int64); ``num_classes`` is taken from the object's
    ``num_classes`` attribute when it has one, else ``max(label) + 1``. Floating targets are
    regression targets. Inputs keep their dtype (token ids stay integers).
    """
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(data, Dataset):
        return data
    declared = getattr(data, "num_classes", None)
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    if pair and not isinstance(data[0], (tuple, list)):
        inputs = _tensor(data[0], "inputs", source)
        targets = _tensor(data[1], "targets", source)
    elif getattr(data, "tensors", None) is not None and len(data.tensors) >= 2:
        inputs, targets = data.tensors[0].detach(), data.tensors[1].detach()
    elif isinstance(data, DataLoader):
        inputs, targets = _from_batches(data, source)
    elif isinstance(data, TorchDataset):
        if not hasattr(data, "__len__"):
            raise DataError(f"{source} returned an iterable-style torch Dataset; wrap it in a "
                            "DataLoader with a batch size.")
        inputs, targets = _from_batches(DataLoader(data, batch_size=256, shuffle=False), source)
    else:
        raise DataError(f"{source} returned {type(data).__name__}; return a ridgeline Dataset, an "
                        "(inputs, targets) pair of tensors, a torch Dataset of (input, target) "
                        "examples, or a DataLoader of (inputs, targets) batches.")
    if inputs.shape[0] != targets.shape[0]:
        raise DataError(f"{source} returned {inputs.shape[0]} inputs but {targets.shape[0]} "
                        "targets; both need one row per example.")
    if inputs.shape[0] == 0:
        raise DataError(f"{source} returned no examples.")
    if targets.is_floating_point():
        num_classes = None
    else:
        targets = targets.long()
        num_classes = int(declared) if declared is not None else int(targets.max()) + 1
    return Dataset(inputs, targets, num_classes, name, {"source": source})
