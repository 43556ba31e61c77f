"""Engines that run sweep tasks: worker processes on this machine, or Ray tasks.

An engine only executes :func:`ridgeline.sweep.task.run_task` and yields each
:class:`TaskResult` as it finishes; it never writes results (the driver does). A task whose
worker dies is retried (Ray: ``max_retries``; local: a fresh process pool), and a task that
raises comes back as a result with ``error`` set, so one bad task never stops the sweep.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import socket
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ridgeline.errors import ConfigError, DistributedError
from ridgeline.sweep.config import SweepTask
from ridgeline.sweep.task import TaskResult, run_task

__all__ = ["Engine", "InProcessEngine", "LocalEngine", "RayEngine", "make_engine"]


class Engine:
    """Runs tasks and yields their results in completion order."""

    name = "engine"

    def map(self, tasks: Sequence[SweepTask]) -> Iterator[TaskResult]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine started (processes, a local Ray instance)."""

    def describe(self) -> dict:
        return {"engine": self.name}


def _failure(task: SweepTask, exc: BaseException) -> TaskResult:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return TaskResult(task.id, error=text)


class InProcessEngine(Engine):
    """Every task in this process, one after the other (the reference for overhead)."""

    name = "inprocess"

    def map(self, tasks: Sequence[SweepTask]) -> Iterator[TaskResult]:
        for task in tasks:
            try:
                yield run_task(task)
            except Exception as exc:  # noqa: BLE001 - reported as the task's error record
                yield _failure(task, exc)


def _guarded(task: SweepTask) -> TaskResult:
    try:
        return run_task(task)
    except Exception as exc:  # noqa: BLE001 - a task error is data, not a crash
        return _failure(task, exc)


class LocalEngine(Engine):
    """Tasks in ``workers`` worker processes on this machine (forked from a forkserver that
    imported torch and ridgeline once; spawned where there is none), one task at a time.

    A worker that dies (killed, out of memory) breaks the pool; the unfinished tasks are
    resubmitted to a fresh pool, at most ``max_retries`` times.
    """

    name = "local"

    def __init__(self, workers: int | None = None, *, max_retries: int = 3,
                 start_method: str | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be ≥ 1; got {workers}.")
        self.workers = workers or max(1, min(os.cpu_count() or 1, 4))
        self.max_retries = max_retries
        self.start_method = start_method

    def describe(self) -> dict:
        return {"engine": self.name, "workers": self.workers}

    def map(self, tasks: Sequence[SweepTask]) -> Iterator[TaskResult]:
        pending = {t.id: t for t in tasks}
        rounds = 0
        context = _worker_context(self.start_method)
        while pending:
            broken = False
            workers = min(self.workers, len(pending))
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_guarded, t): t for t in pending.values()}
                waiting = set(futures)
                while waiting:
                    finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for future in finished:
                        task = futures[future]
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            broken = True
                            continue
                        except Exception as exc:  # noqa: BLE001 - e.g. unpicklable result
                            result = _failure(task, exc)
                        pending.pop(task.id, None)
                        yield result
            if broken:
                rounds += 1
                if rounds > self.max_retries:
                    for task in pending.values():
                        yield TaskResult(task.id, error=f"its worker process died {rounds} times "
                                                        "(killed or out of memory)")
                    return


_PRELOAD = ["ridgeline.sweep._preload"]


def _worker_context(method: str | None = None):
    """Workers are forked from a forkserver that has imported torch and ridgeline once (a
    worker then starts in milliseconds instead of re-importing them); ``spawn`` where there
    is no forkserver (Windows, macOS defaults aside)."""
    method = method or ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                        else "spawn")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(_PRELOAD)
    return context


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (DistributedError) when ``ray://HOST:PORT`` or ``HOST:PORT`` does not answer."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not 'auto', 'ray://HOST:PORT' or "
                          "'HOST:PORT'.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise DistributedError(f"the Ray cluster at {address!r} is unreachable ({exc}); start it "
                               "with `ray start --head` on the head node, check host, port and "
                               "firewall, or leave --address out to start Ray on this "
                               "machine.") from exc


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


class RayEngine(Engine):
    """One Ray task per sweep task (train + measurements), results streamed to the driver.

    ``address=None`` starts Ray on this machine with ``num_cpus=workers``; ``"auto"`` joins
    the cluster this machine belongs to; ``"ray://HOST:PORT"`` connects a Ray client.
    Each task asks for one CPU and ``gpus_per_task`` GPUs; a task whose worker process (or
    node) dies is resubmitted by Ray up to ``max_retries`` times.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None,
                 gpus_per_task: float = 0.0, max_retries: int = 3) -> None:
        if not ray_available():
            raise ConfigError("--engine ray needs Ray, which is not installed; install the extra "
                              "with `pip install 'ridgeline[ray]'` (or use --engine local).")
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be ≥ 1; got {workers}.")
        if gpus_per_task < 0:
            raise ConfigError(f"--gpus-per-task must be ≥ 0; got {gpus_per_task}.")
        if address not in (None, "auto"):
            _check_reachable(address)
        import ray

        self._started = False
        if not ray.is_initialized():
            kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                kwargs["num_cpus"] = workers
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError) as exc:
                raise DistributedError(f"could not connect to the Ray cluster at {address!r}: "
                                       f"{str(exc).rstrip('.')}. Start one with `ray start --head`, or leave "
                                       "--address out to start Ray on this machine.") from exc
            self._started = True
        self.address, self.workers = address, workers
        self.gpus_per_task, self.max_retries = gpus_per_task, max_retries
        self._remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task,
                                  max_retries=max_retries)(run_task)

    def describe(self) -> dict:
        import ray

        return {"engine": self.name, "address": self.address, "workers": self.workers,
                "gpus_per_task": self.gpus_per_task,
                "cluster_cpus": ray.cluster_resources().get("CPU")}

    def map(self, tasks: Sequence[SweepTask]) -> Iterator[TaskResult]:
        import ray
        from ray.exceptions import RayError

        queue = list(tasks)
        limit = self.workers or len(queue) or 1
        running: dict = {}
        while queue or running:
            while queue and len(running) < limit:
                task = queue.pop(0)
                running[self._remote.remote(task)] = task
            try:
                done, _ = ray.wait(list(running), num_returns=1)
            except (RayError, ConnectionError) as exc:
                raise DistributedError(f"lost the Ray cluster ({exc}); the finished models are "
                                       "in results.jsonl: run the same command again (with "
                                       "the cluster back) to resume.") from exc
            for ref in done:
                task = running.pop(ref)
                try:
                    yield ray.get(ref)
                except RayError as exc:
                    cause = getattr(exc, "cause", None)
                    yield _failure(task, cause if isinstance(cause, BaseException) else exc)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def make_engine(engine: str, *, workers: int | None = None, address: str | None = None,
                gpus_per_task: float = 0.0) -> Engine:
    """An engine by name: ``"local"`` (default), ``"ray"`` or ``"inprocess"``."""
    if engine == "local":
        if address is not None or gpus_per_task:
            raise ConfigError("--address and --gpus-per-task apply to --engine ray only.")
        return LocalEngine(workers)
    if engine == "ray":
        return RayEngine(address, workers=workers, gpus_per_task=gpus_per_task)
    if engine == "inprocess":
        return InProcessEngine()
    raise ConfigError(f"unknown engine {engine!r}; use 'local' or 'ray'.")
