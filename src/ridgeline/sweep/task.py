"""One task of a sweep: train one model, run its measurements, measure its generalization.

A task runs in a worker (a local process or a Ray worker) in a private temporary folder and
returns its records and checkpoint bytes; it never touches the sweep's run folder, so the
driver stays the only writer of ``results.jsonl``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ridgeline._json import to_jsonable
from ridgeline.sweep.config import SweepTask

__all__ = ["TaskResult", "run_task", "generalization"]


@dataclass(frozen=True)
class TaskResult:
    """What a worker sends back: the task's records, or the error that stopped it."""

    task_id: str
    records: list[dict] = field(default_factory=list)
    checkpoints: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    host: str = ""
    pid: int = 0
    seconds: float = 0.0


def generalization(model: torch.nn.Module, train, test, loss: str = "cross_entropy") -> dict:
    """Loss and error of a trained model on the full training and test sets, and the gaps.

    gap_error = test error − train error; gap_loss = test loss − train loss (Jiang et al.
    2020, "Fantastic generalization measures"), with error = 1 − accuracy.
    """
    from ridgeline.losses import resolve_loss
    from ridgeline.objective import module_mode

    _, loss_fn = resolve_loss(loss)
    out: dict = {}
    with torch.no_grad(), module_mode(model, False):
        for split, data in (("train", train), ("test", test)):
            outputs = model(data.inputs)
            out[f"{split}_loss"] = float(loss_fn(outputs, data.targets))
            if not data.targets.is_floating_point():
                out[f"{split}_error"] = float((outputs.argmax(-1) != data.targets).double().mean())
    out["gap_loss"] = out["test_loss"] - out["train_loss"]
    if "train_error" in out:
        out["gap_error"] = out["test_error"] - out["train_error"]
    return out


def _clean(record: dict) -> dict:
    return json.loads(json.dumps(to_jsonable(record), allow_nan=False))


def run_task(task: SweepTask) -> TaskResult:
    """Train the task's model and run its measurements; returns every record (JSON-safe).

    Deterministic: the same task gives the same numbers in any process on any engine
    (``torch.set_num_threads(task.threads)``, seeds from the config).
    """
    from ridgeline.study.config import StudyConfig
    from ridgeline.study.context import StudyContext
    from ridgeline.study.registry import get_measurement
    from ridgeline.study.store import ResultStore

    began = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        config = StudyConfig(**task.study)
        records: list[dict] = []
        checkpoints: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix=f"ridgeline-{task.id}-") as tmp:
            store = ResultStore(tmp)
            ctx = StudyContext(config, Path(tmp), progress=False, store=store)
            common = {"status": "ok", "fingerprint": task.fingerprint,
                      "sweep": {"task": task.id, "model": task.base_model,
                                "settings": task.settings}}
            for item in task.plan:
                kind = get_measurement(item.kind)
                started = time.time()
                result = kind.run(ctx, kind.options(**item.options))
                record = _clean({"id": item.id, "kind": item.kind, "options": item.options,
                                 "started": started, "duration_s": time.time() - started,
                                 "result": result, **common})
                store.append(record)
                records.append(record)
            started = time.time()
            settings = config.training_for(task.id)
            gap = generalization(ctx.model(task.id), ctx.dataset("train"), ctx.dataset("test"),
                                 settings.loss)
            records.append(_clean({"id": f"model:{task.id}", "kind": "sweep_model",
                                   "options": {"model": task.id}, "started": started,
                                   "duration_s": time.time() - started,
                                   "result": {"model": task.id, "base_model": task.base_model,
                                              "settings": task.settings, **gap}, **common}))
            if task.checkpoints:
                for path in sorted((Path(tmp) / "checkpoints").glob("*.safetensors")):
                    checkpoints[path.name] = path.read_bytes()
        return TaskResult(task.id, records, checkpoints, None, socket.gethostname(), os.getpid(),
                          time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
