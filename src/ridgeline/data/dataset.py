"""The in-memory dataset every ridgeline instrument accepts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ridgeline.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Inputs and targets held as tensors, with the facts instruments need.

    Attributes
    ----------
    inputs : Tensor (N, ...)
    targets : Tensor (N,) of class indices (int64) or (N, O) regression targets.
    num_classes : int or None
        Number of classes for classification data, ``None`` for regression.
    name : str
    metadata : dict
        How the data was made (generator arguments), JSON-safe.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int | None
    name: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise DataError(
                f"dataset '{self.name}' has {self.inputs.shape[0]} inputs but "
                f"{self.targets.shape[0]} targets; both need one row per example."
            )
        if self.inputs.shape[0] == 0:
            raise DataError(f"dataset '{self.name}' is empty; it needs at least one example.")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def subset(self, n: int | None = None, *, indices: torch.Tensor | None = None,
               name: str | None = None) -> Dataset:
        """The first ``n`` examples, or the examples at ``indices``."""
        if indices is None:
            indices = torch.arange(min(n if n is not None else len(self), len(self)))
        return Dataset(self.inputs[indices], self.targets[indices], self.num_classes,
                       name or self.name, dict(self.metadata))

    def to(self, device=None, dtype: torch.dtype | None = None) -> Dataset:
        """Move to a device; ``dtype`` converts the inputs (and float targets) only."""
        inputs = self.inputs.to(device=device, dtype=dtype) if dtype else self.inputs.to(device)
        targets = self.targets.to(device)
        if dtype is not None and targets.is_floating_point():
            targets = targets.to(dtype)
        return Dataset(inputs, targets, self.num_classes, self.name, dict(self.metadata))

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs, self.targets

    def class_subset(self, label: int) -> Dataset:
        """The examples of one class."""
        mask = self.targets == label
        return self.subset(indices=mask.nonzero().flatten(), name=f"{self.name}[class={label}]")
