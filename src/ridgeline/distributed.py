"""torch.distributed helpers; every function is a no-op in a single process.

ridgeline never starts processes or picks a backend itself: under ``torchrun`` the user (or
``ridgeline.study``) initialises the default process group, and :class:`~ridgeline.Objective`
then shards data by rank and all-reduces through these helpers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ridgeline.errors import DistributedError

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "all_reduce_sum",
           "all_reduce_tree", "barrier", "check_consistent", "shard_indices",
           "init_from_environment", "shutdown", "exit_process"]


def is_distributed() -> bool:
    """True when a default process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes results."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _backend_device() -> torch.device | None:
    if not is_distributed():
        return None
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (returns a new tensor; input untouched)."""
    if not is_distributed():
        return tensor
    device = _backend_device()
    work = tensor.detach().to(device).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_tree(tree: Any) -> Any:
    """All-reduce (sum) every tensor of a pytree in one flat communication."""
    if not is_distributed():
        return tree
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(tree)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not tensors:
        return tree
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    flat = all_reduce_sum(flat)
    out, offset = [], 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            n = leaf.numel()
            out.append(flat[offset:offset + n].reshape(leaf.shape).to(leaf.dtype))
            offset += n
        else:
            out.append(leaf)
    return tree_unflatten(out, spec)


def check_consistent(value: float | int, what: str) -> None:
    """Raise if ``value`` differs between processes (e.g. dataset sizes or seeds)."""
    if not is_distributed():
        return
    mine = torch.tensor([float(value)], dtype=torch.float64)
    low, high = mine.clone(), mine.clone()
    device = _backend_device()
    low, high = low.to(device), high.to(device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise DistributedError(
            f"{what} differs between processes (rank {rank()} has {value}; values range "
            f"from {low.item()} to {high.item()}). Every rank must get the same {what}: "
            "pass identical data and seeds on every process.")


def shard_indices(items: Iterable[int] | int) -> list[int]:
    """This rank's items when they are dealt round-robin over processes."""
    items = list(range(items)) if isinstance(items, int) else list(items)
    return items[rank()::world_size()]


def shutdown() -> None:
    """Destroy the default process group now; a no-op when there is none (or it is gone).

    Every process that initialised a group must do this before the interpreter shuts
    down. The race it closes (seen as SIGABRT, "terminate called without an active
    exception", in a rank of a 2-process test): gloo's worker thread (``pt_gloo_runloop``)
    drops the last collective's work object some time after the main thread's ``wait()``
    has returned; the work holds tensors owned by Python objects, so dropping it takes the
    GIL. If the main thread has meanwhile reached ``Py_FinalizeEx``, CPython ends any thread
    that asks for the GIL with ``pthread_exit``, whose forced unwinding runs through the
    work's C++ destructor, which may not throw: ``std::terminate``. It is random, likelier
    on a loaded machine and in ranks that finish before rank 0 (they have nothing to
    write). Destroying the group while Python is whole joins those threads first. No
    barrier is needed for that (every collective this rank issued has returned), and none
    is taken: at an exit caused by an exception the other ranks may never arrive, and a
    barrier would hold this process for the group's whole timeout.
    :func:`init_from_environment` registers this function with :mod:`atexit`, so it runs
    on every normal exit, ``sys.exit`` and uncaught exceptions included.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a process that ran under a process group, skipping interpreter finalisation.

    Flushes stdout and stderr, destroys the group (:func:`shutdown`) and calls
    ``os._exit(code)``. Destroying the group first was not enough on a loaded machine: a
    fresh-clone test run still saw one rank abort ("terminate called without an active
    exception") while CPython finalised. With no finalisation there is no thread for
    CPython to end inside gloo's C++ destructors. Results must already be written (they
    are: every write in ridgeline is flushed and fsynced); atexit handlers of other
    libraries do not run.
    """
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    shutdown()
    os._exit(code)


def init_from_environment(backend: str | None = None) -> bool:
    """Initialise the default process group if launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Returns True when a group was initialised here. Chooses NCCL when CUDA is available,
    gloo otherwise, unless ``backend`` is given. The group is destroyed by :func:`shutdown`
    when the process exits (registered with :mod:`atexit`; calling it earlier is fine).
    """
    import atexit
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    # atexit runs handlers last-registered first, so this one runs before torch's own and
    # while the interpreter is whole (see shutdown for the abort it prevents)
    atexit.register(shutdown)
    return True
