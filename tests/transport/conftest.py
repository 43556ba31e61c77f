"""Transport tests run single-threaded: their tensors are small, and on a shared machine
OpenMP threads contending for cores make tiny matrix products 20-40x slower. Results do
not depend on the thread count; the previous setting is restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
