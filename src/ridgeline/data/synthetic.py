"""Synthetic datasets: Gaussian mixtures and teacher networks."""

from __future__ import annotations

import torch
from torch import nn

from ridgeline.data.dataset import Dataset
from ridgeline.errors import DataError


def _generators(seed: int, split: str) -> tuple[torch.Generator, torch.Generator]:
    """One generator for the task (means, teacher weights), one for the split's examples."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    offset = 1 if split == "train" else 2
    return (torch.Generator().manual_seed(seed),
            torch.Generator().manual_seed(1_000_003 * seed + offset))


def gaussian_mixture(num_samples: int = 1000, *, num_classes: int = 4, dim: int = 2,
                     separation: float = 3.0, std: float = 1.0, seed: int = 0,
                     split: str = "train") -> Dataset:
    """Isotropic Gaussian clusters, one per class, with means drawn on a sphere.

    x | y=c ~ N(μ_c, std² I), μ_c = separation · u_c with u_c uniform on S^{dim−1};
    classes are balanced (up to one example).
    """
    if num_samples < num_classes or num_classes < 1 or dim < 1:
        raise DataError(
            f"gaussian_mixture needs num_samples ≥ num_classes ≥ 1 and dim ≥ 1; got "
            f"num_samples={num_samples}, num_classes={num_classes}, dim={dim}.")
    task, gen = _generators(seed, split)
    means = torch.randn(num_classes, dim, generator=task)
    means = separation * means / means.norm(dim=1, keepdim=True)
    targets = torch.arange(num_samples) % num_classes
    targets = targets[torch.randperm(num_samples, generator=gen)]
    inputs = means[targets] + std * torch.randn(num_samples, dim, generator=gen)
    return Dataset(inputs, targets, num_classes, f"gaussian-mixture-{split}",
                   {"num_samples": num_samples, "num_classes": num_classes, "dim": dim,
                    "separation": separation, "std": std, "seed": seed, "split": split})


def teacher(num_samples: int = 1000, *, dim: int = 10, width: int = 32, outputs: int = 1,
            classification: bool = False, noise: float = 0.0, seed: int = 0,
            split: str = "train") -> Dataset:
    """Inputs x ~ N(0, I) labelled by a random one-hidden-layer tanh teacher network.

    Regression targets are the teacher's outputs plus Gaussian noise of std ``noise``;
    with ``classification=True`` the targets are the argmax over ``outputs`` classes.
    """
    if num_samples < 1 or dim < 1 or width < 1 or outputs < 1:
        raise DataError("teacher needs positive num_samples, dim, width and outputs.")
    if classification and outputs < 2:
        raise DataError("a classification teacher needs outputs ≥ 2 (one per class).")
    task, gen = _generators(seed, split)
    w1 = torch.randn(dim, width, generator=task) / dim**0.5
    w2 = torch.randn(width, outputs, generator=task) / width**0.5
    inputs = torch.randn(num_samples, dim, generator=gen)
    with torch.no_grad():
        out = nn.functional.tanh(inputs @ w1) @ w2
    if classification:
        targets = out.argmax(dim=1)
        num_classes: int | None = outputs
    else:
        targets = out + noise * torch.randn(out.shape, generator=gen)
        num_classes = None
    return Dataset(inputs, targets, num_classes, f"teacher-{split}",
                   {"num_samples": num_samples, "dim": dim, "width": width, "outputs": outputs,
                    "classification": classification, "noise": noise, "seed": seed,
                    "split": split})
