"""Shared fixtures: tiny models and data, float64 where exactness is checked."""

from __future__ import annotations

import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("RIDGELINE_QUIET", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated datasets go to one cache per test session, never the user's."""
    monkeypatch.setenv("RIDGELINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Test tensors are tiny: one thread avoids OpenMP threads contending for the cores
    (20-40x slower tiny products on a busy 2-core machine). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=gen)
    return x, y


@pytest.fixture
def tiny_mlp():
    from ridgeline.models import mlp

    torch.manual_seed(0)
    return mlp(5, [7], 3, activation="tanh").double()


USER_NETS = '''
import torch
from torch import nn


def make(in_features=12, width=8, out_features=3):
    """A user model factory."""
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, out_features))


def not_a_module():
    return 3


NOT_CALLABLE = 3
'''

USER_DATA = '''
import torch


def load(split="train", n=48, dim=12, classes=3):
    """(inputs, targets) of a split: different seeds for train and test."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).float()
    return x, torch.randint(0, classes, (n,), generator=g)


def loader(split="train", n=48, batch_size=10):
    x, y = load(split, n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, split):
        self.x, self.y = load(split)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def examples(split="train"):
    return Pairs(split)


def wrong(split="train"):
    return "not data"


def no_split(n=4):
    return load("train", n)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A tiny user package ``rl_userpkg`` (nets.py: model factories, data.py: data functions,
    broken.py: fails on import) in tmp_path/code, put on sys.path; yields that folder."""
    import sys

    root = tmp_path / "code"
    package = root / "rl_userpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(USER_NETS)
    (package / "data.py").write_text(USER_DATA)
    (package / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m == "rl_userpkg" or m.startswith("rl_userpkg.")]:
        del sys.modules[name]
