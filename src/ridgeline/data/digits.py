"""scikit-learn's handwritten digits (1797 images of 8x8), with a fixed split."""

from __future__ import annotations

import torch

from ridgeline.data.dataset import Dataset
from ridgeline.errors import DataError


def digits(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0,
           flatten: bool = True) -> Dataset:
    """The UCI digits from ``sklearn.datasets.load_digits`` (bundled, no download).

    Pixels are scaled to [0, 1]. The split is a fixed permutation drawn from ``seed``.

    Parameters
    ----------
    split : {"train", "test"}
    test_fraction : float
    seed : int
    flatten : bool
        ``True`` gives inputs of shape (N, 64); ``False`` gives (N, 1, 8, 8) images.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    inputs = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(targets)))
    chosen = order[n_test:] if split == "train" else order[:n_test]
    inputs = inputs[chosen]
    if not flatten:
        inputs = inputs.reshape(-1, 1, 8, 8)
    return Dataset(inputs.contiguous(), targets[chosen].contiguous(), num_classes=10,
                   name=f"digits-{split}",
                   metadata={"generator": "sklearn.datasets.load_digits", "seed": seed,
                             "test_fraction": test_fraction, "split": split})
