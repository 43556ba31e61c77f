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
