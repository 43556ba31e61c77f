"""Built-in datasets: MNIST-1D, scikit-learn digits, and synthetic sets."""

from __future__ import annotations

from ridgeline.data.dataset import Dataset
from ridgeline.data.digits import digits
from ridgeline.data.mnist1d import mnist1d
from ridgeline.data.synthetic import gaussian_mixture, teacher
from ridgeline.data.user import as_dataset, load_user_data
from ridgeline.errors import DataError

__all__ = ["Dataset", "mnist1d", "digits", "gaussian_mixture", "teacher", "load_dataset",
           "load_user_data", "as_dataset", "check_dataset", "DATASETS"]

DATASETS = {"mnist1d": mnist1d, "digits": digits, "gaussian_mixture": gaussian_mixture,
            "teacher": teacher}


def load_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """A dataset by name, with its keyword arguments.

    ``name`` is a built-in dataset (``"mnist1d"``, ``"digits"``, ``"gaussian_mixture"``,
    ``"teacher"``) or user code written ``"package.module:callable"``, called as
    ``callable(split=split, **kwargs)`` (see :func:`ridgeline.data.user.load_user_data`).
    """
    if ":" in name:
        from ridgeline.data.user import load_user_data

        return load_user_data(name, split, **kwargs)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; built-in datasets are {sorted(DATASETS)}, or "
                        "name your own data function as 'package.module:callable'.")
    try:
        return DATASETS[name](split=split, **kwargs)
    except TypeError as exc:
        raise DataError(f"bad arguments for dataset {name!r}: {exc}") from exc


def check_dataset(name: str, **kwargs) -> None:
    """Check a dataset name and its arguments without loading it: a built-in name, or user
    code ``"package.module:callable"`` that imports and accepts ``split=`` and ``kwargs``.
    Raises :class:`~ridgeline.errors.ConfigError`/:class:`DataError`; for validating a study
    before any work."""
    from ridgeline.usercode import check_arguments, resolve_callable

    if ":" in name:
        check_arguments(resolve_callable(name, "data function"), name, "data function",
                        split="train", **kwargs)
        return
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; built-in datasets are {sorted(DATASETS)}, or "
                        "name your own data function as 'package.module:callable'.")
    check_arguments(DATASETS[name], name, "dataset", split="train", **kwargs)
