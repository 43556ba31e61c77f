"""Built-in datasets: MNIST-1D, scikit-learn digits, and synthetic sets."""

from __future__ import annotations

from ridgeline.data.dataset import Dataset
from ridgeline.data.digits import digits
from ridgeline.data.mnist1d import mnist1d
from ridgeline.data.synthetic import gaussian_mixture, teacher
from ridgeline.errors import DataError

__all__ = ["Dataset", "mnist1d", "digits", "gaussian_mixture", "teacher", "load_dataset",
           "DATASETS"]

DATASETS = {"mnist1d": mnist1d, "digits": digits, "gaussian_mixture": gaussian_mixture,
            "teacher": teacher}


def load_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """A built-in dataset by name: ``"mnist1d"``, ``"digits"``, ``"gaussian_mixture"`` or
    ``"teacher"``, with that dataset's keyword arguments."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; built-in datasets are {sorted(DATASETS)}.")
    try:
        return DATASETS[name](split=split, **kwargs)
    except TypeError as exc:
        raise DataError(f"bad arguments for dataset {name!r}: {exc}") from exc
