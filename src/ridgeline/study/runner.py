"""Run a study: train its models, run each measurement not yet in results.jsonl, report.

Resuming is the normal case: a measurement whose id (and options) already has a record
is skipped, so a study interrupted by Ctrl-C or a crash continues where it stopped and
never loses or recomputes a finished measurement.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ridgeline import distributed
from ridgeline._version import __version__
from ridgeline.progress import console
from ridgeline.study.config import MeasurementConfig, StudyConfig, dump_toml
from ridgeline.study.context import StudyContext
from ridgeline.study.registry import get_measurement
from ridgeline.study.store import ResultStore, atomic_write_text, to_jsonable

__all__ = ["run_study", "planned_measurements", "StudyOutcome", "PlannedMeasurement",
           "environment"]


@dataclass(frozen=True)
class PlannedMeasurement:
    id: str
    kind: str
    options: dict
    fingerprint: str


@dataclass(frozen=True)
class StudyOutcome:
    run_dir: Path
    report: Path | None
    ran: list[str]
    skipped: list[str]


def _fingerprint(kind: str, options: dict, config: StudyConfig) -> str:
    """Changes when the measurement's options, the data, or the models' setup change."""
    basis = {"kind": kind, "options": options, "data": config.data.model_dump(),
             "models": [m.model_dump() for m in config.models],
             "training": config.training.model_dump(), "seed": config.seed}
    return hashlib.sha256(json.dumps(to_jsonable(basis), sort_keys=True, default=str).encode()).hexdigest()[:16]


def planned_measurements(config: StudyConfig) -> list[PlannedMeasurement]:
    """Training of every model first (unless listed explicitly), then the configured
    measurements in order; ids are unique."""
    entries: list[MeasurementConfig] = list(config.measurements)
    trained = {e.options.get("model") for e in entries if e.kind == "train"}
    implicit = [MeasurementConfig(kind="train", id=f"train:{m.name}", model=m.name)
                for m in config.models if m.name not in trained]
    plan, seen = [], set()
    for entry in [*implicit, *entries]:
        kind = get_measurement(entry.kind)
        options = kind.parse_options(entry.options, f"measurement {entry.id or entry.kind!r}")
        ident = entry.id or (f"train:{entry.options['model']}" if entry.kind == "train" else entry.kind)
        base, n = ident, 2
        while ident in seen:
            ident, n = f"{base}-{n}", n + 1
        seen.add(ident)
        dumped = options.model_dump(mode="json")
        plan.append(PlannedMeasurement(ident, entry.kind, dumped, _fingerprint(entry.kind, dumped, config)))
    return plan


def environment() -> dict:
    import numpy
    import scipy

    return {"ridgeline": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "world_size": distributed.world_size()}


def run_study(config: StudyConfig, run_dir: str | Path | None = None, *, progress: bool = True,
              report: bool = True, config_text: str | None = None) -> StudyOutcome:
    """Run (or resume) a study in ``run_dir`` (default ``runs/<name>``).

    Writes ``config.toml``, appends one line per finished measurement to ``results.jsonl``,
    keeps checkpoints under ``checkpoints/`` and regenerates ``report.html``.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.name
    store = ResultStore(run_dir)
    plan = planned_measurements(config)  # validates every option before any work
    text = config_text or dump_toml(config.model_dump(mode="json", exclude_none=True))
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", text)
    done = {r["id"]: r for r in store.records() if r.get("status") == "ok"}
    if "study" not in done:
        store.append({"id": "study", "kind": "study", "status": "ok",
                      "result": {"name": config.name, "description": config.description,
                                 "config": config.model_dump(mode="json"), "config_text": text,
                                 "environment": environment()}})
    ctx = StudyContext(config, run_dir, progress=progress, store=store)
    ran, skipped = [], []
    say = console().print if progress is not False else (lambda *a, **k: None)
    for index, item in enumerate(plan, 1):
        previous = done.get(item.id)
        if previous is not None and previous.get("fingerprint") == item.fingerprint:
            skipped.append(item.id)
            continue
        say(f"[bold cyan][{index}/{len(plan)}][/] {item.id} …")
        kind = get_measurement(item.kind)
        started = time.time()
        result = kind.run(ctx, kind.options(**item.options))
        store.append({"id": item.id, "kind": item.kind, "status": "ok", "options": item.options,
                      "fingerprint": item.fingerprint, "started": started,
                      "duration_s": time.time() - started, "result": result})
        say(f"    done in {time.time() - started:.1f} s")
        ran.append(item.id)
    distributed.barrier()
    report_path = None
    if report and distributed.is_main_process():
        from ridgeline.study.report import write_report

        report_path = write_report(run_dir)
    return StudyOutcome(run_dir, report_path, ran, skipped)
