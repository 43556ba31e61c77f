"""A dataset wrapper that also yields each example's index (what SAF's buffer is keyed by)."""

from __future__ import annotations

from typing import Any

import torch

from ridgeline.data.dataset import Dataset
from ridgeline.errors import DataError

__all__ = ["IndexedDataset"]


class IndexedDataset(torch.utils.data.Dataset):
    """Wrap a dataset so that item ``i`` is ``(x, y, i)``.

    Use it with your own ``DataLoader`` (shuffled or not) and pass the third element of
    each batch to :class:`~ridgeline.optim.TrajectoryLoss`::

        loader = DataLoader(IndexedDataset(train_set), batch_size=128, shuffle=True)
        for x, y, index in loader:
            outputs = model(x)
            loss = loss_fn(outputs, y) + saf(outputs, index, epoch)

    Parameters
    ----------
    data : torch Dataset (map-style), ridgeline Dataset, or (inputs, targets) tensors
        A map-style dataset's items must be ``(x, y)`` pairs.
    """

    def __init__(self, data: Any) -> None:
        from ridgeline.train import coerce_tensors

        if isinstance(data, (Dataset, tuple, list)):
            inputs, targets, _ = coerce_tensors(data)
            self._dataset, self._tensors = None, (inputs, targets)
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._dataset, self._tensors = data, None
        else:
            raise DataError(f"IndexedDataset needs a map-style dataset (with __getitem__ and "
                            f"__len__), a ridgeline Dataset or (inputs, targets) tensors; got "
                            f"{type(data).__name__}.")

    def __len__(self) -> int:
        if self._tensors is not None:
            return int(self._tensors[0].shape[0])
        return len(self._dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        if self._tensors is not None:
            return self._tensors[0][index], self._tensors[1][index], index
        x, y = self._dataset[index]
        return x, y, index
