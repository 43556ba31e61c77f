"""Run a study: train its models, run each measurement not yet in results.jsonl, report.

Resuming is the normal case: a measurement whose id (and options) already has a record
is skipped, so a study interrupted by Ctrl-C or a crash continues where it stopped and
never loses or recomputes a finished measurement. A ``train`` record counts only while its
checkpoint exists, loads and is the one it wrote; any other record only while the
checkpoints it was computed from are unchanged: a lost or replaced checkpoint is retrained
and what used it is redone.

The whole study is validated before any work (:func:`ridgeline.study.validate.validate_study`),
and the run folder is locked (:class:`ridgeline.study.lock.RunLock`) so that two runs never
write into one folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ridgeline import distributed
from ridgeline._version import __version__
from ridgeline.errors import ConfigError, RidgelineError, RunInUseError
from ridgeline.progress import console
from ridgeline.study.config import MeasurementConfig, StudyConfig, dump_toml
from ridgeline.study.context import StudyContext
from ridgeline.study.lock import RunLock
from ridgeline.study.registry import get_measurement
from ridgeline.study.store import (
    ResultStore,
    atomic_write_text,
    remove_stale_temporaries,
    to_jsonable,
)
from ridgeline.study.validate import model_references, validate_study

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


def settings(config: StudyConfig) -> dict:
    """The study settings every measurement depends on (data, models, training, seed); each
    record stores the ones it was computed with."""
    return to_jsonable({"data": config.data.model_dump(),
                        "models": [m.model_dump() for m in config.models],
                        "training": config.training.model_dump(), "seed": config.seed})


def _fingerprint(kind: str, options: dict, config: StudyConfig,
                 defaults: dict | None = None) -> str:
    """Changes when the measurement's options, the data, the models' setup, or the library
    defaults the options leave open (``defaults``, from ``Options.resume_key``) change."""
    basis = {"kind": kind, "options": options, **settings(config)}
    if defaults:  # only then: the fingerprints of other records stay as they were
        basis["defaults"] = defaults
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
        plan.append(PlannedMeasurement(ident, entry.kind, dumped,
                                       _fingerprint(entry.kind, dumped, config,
                                                    options.resume_key())))
    return plan


def environment() -> dict:
    import numpy
    import scipy

    return {"ridgeline": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "world_size": distributed.world_size()}


def _rank0_says(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (so that all ranks take the same branch)."""
    if not distributed.is_distributed():
        return value
    flag = torch.tensor([1.0 if distributed.is_main_process() and value else 0.0])
    return bool(distributed.all_reduce_sum(flag).item() > 0)


def _lock(run_dir: Path, stack: contextlib.ExitStack, say) -> None:
    """Lock the run folder (rank 0 only; every rank fails if it is in use)."""
    error = None
    if distributed.is_main_process():
        try:
            lock = stack.enter_context(RunLock(run_dir))
            if lock.stale is not None:
                say(f"[yellow]took over the lock of process {lock.stale['pid']}, which stopped "
                    "without releasing it[/]")
        except RunInUseError as exc:
            error = exc
    if not _rank0_says(error is None):
        raise error or RunInUseError(f"rank 0 could not lock the run folder {run_dir}: it is "
                                     "in use by another run.")


def _redo_reason(item: PlannedMeasurement, previous: dict | None, ctx: StudyContext,
                 retrained: set[str]) -> str | None:
    """Why ``item`` must run although it may have a record (None: its record holds)."""
    if previous is None:
        return "not done yet"
    if previous.get("fingerprint") != item.fingerprint:
        return "its options or the study's settings changed"
    if item.kind == "train":
        from ridgeline.train import load

        name = item.options["model"]
        path = ctx.checkpoint_path(name)
        digest = ctx.checkpoint_digest(name)
        if digest is None:
            return f"the checkpoint {path.name} is missing"
        if previous.get("checkpoint_sha256") not in (None, digest):
            return f"the checkpoint {path.name} is not the one this training wrote"
        try:
            load(path, ctx.build(name))
        except RidgelineError as exc:
            return f"the checkpoint {path.name} does not load ({exc})"
        return None
    used = previous.get("checkpoints")
    if used is None:  # a record from before checkpoints were tracked: its options say
        kind = get_measurement(item.kind)
        used = {n: None for names in model_references(kind.options(**item.options)).values()
                for n in names}
    for name, digest in used.items():
        now = ctx.checkpoint_digest(name)
        if now is None:
            return f"model {name!r}'s checkpoint, which it used, is missing"
        if (digest is None and name in retrained) or digest not in (None, now):
            return f"model {name!r} was retrained since"
    return None


def _prepare(run_dir: Path, store: ResultStore, config_text: str, say) -> None:
    """Rank 0, holding the lock: clear what a killed run left, and record the config."""
    removed = remove_stale_temporaries(run_dir)
    if removed:
        say(f"removed {len(removed)} unfinished temporary file(s) of an interrupted run")
    moved, where = store.quarantine()
    if moved:
        warnings.warn(f"{store.path}: {moved} unreadable line(s) (not UTF-8 JSON records: a "
                      f"write cut short, or bytes appended by something else) were moved to "
                      f"{where}; any measurement they held is redone.", stacklevel=3)
    atomic_write_text(run_dir / "config.toml", config_text)


def run_study(config: StudyConfig, run_dir: str | Path | None = None, *, progress: bool = True,
              report: bool = True, config_text: str | None = None) -> StudyOutcome:
    """Run (or resume) a study in ``run_dir`` (default ``runs/<name>``).

    Validates the whole study first (nothing is written when it fails), locks the run folder
    (:class:`~ridgeline.errors.RunInUseError` when another run holds it), writes
    ``config.toml``, appends one line per finished measurement to ``results.jsonl``, keeps
    checkpoints under ``checkpoints/`` and regenerates ``report.html``.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the run folder {run_dir} is a file, not a folder: pass --out a new "
                          "or existing folder (a study writes several files into it).")
    say = console().print if progress is not False else (lambda *a, **k: None)
    store = ResultStore(run_dir)
    ctx = StudyContext(config, run_dir, progress=progress, store=store)
    with contextlib.ExitStack() as stack:
        existed = _rank0_says(run_dir.is_dir())  # one answer, before any rank creates it
        if existed:
            _lock(run_dir, stack, say)  # refuse a folder in use before any other work
        validate_study(config, context=ctx)
        plan = planned_measurements(config)
        text = config_text or dump_toml(config.model_dump(mode="json", exclude_none=True))
        if not existed:
            error = None
            if distributed.is_main_process():
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    error = ConfigError(f"cannot create the run folder {run_dir}: {exc}. Pass "
                                        "--out a folder that can be created and written.")
            if not _rank0_says(error is None):
                raise error or ConfigError(f"rank 0 could not create the run folder {run_dir}.")
            _lock(run_dir, stack, say)
        if distributed.is_main_process():
            _prepare(run_dir, store, text, say)
        distributed.barrier()
        return _run(config, plan, ctx, text, say, report)


def _run(config: StudyConfig, plan: list[PlannedMeasurement], ctx: StudyContext, text: str,
         say, report: bool) -> StudyOutcome:
    store, run_dir = ctx.store, ctx.run_dir
    current = settings(config)
    digest = hashlib.sha256(json.dumps([text, current], sort_keys=True).encode()).hexdigest()[:16]
    records = store.records()
    studies = [r for r in records if r.get("kind") == "study"]
    if not studies or studies[-1].get("config_digest") != digest:
        store.append({"id": "study", "kind": "study", "status": "ok", "config_digest": digest,
                      "result": {"name": config.name, "description": config.description,
                                 "config": config.model_dump(mode="json"), "config_text": text,
                                 "settings": current, "environment": environment()}})
    done = {r["id"]: r for r in records if r.get("status") == "ok"}
    ran, skipped, retrained = [], [], set()
    for index, item in enumerate(plan, 1):
        reason = _redo_reason(item, done.get(item.id), ctx, retrained)
        if _rank0_says(reason is None):
            skipped.append(item.id)
            continue
        again = "" if reason in (None, "not done yet") else f" (again: {reason})"
        say(f"[bold cyan][{index}/{len(plan)}][/] {item.id} …{again}")
        kind = get_measurement(item.kind)
        ctx.used_checkpoints = {}
        started = time.time()
        result = kind.run(ctx, kind.options(**item.options))
        record = {"id": item.id, "kind": item.kind, "status": "ok", "options": item.options,
                  "fingerprint": item.fingerprint, "config_digest": digest, "settings": current,
                  "checkpoints": dict(ctx.used_checkpoints), "started": started,
                  "duration_s": time.time() - started, "result": result}
        if item.kind == "train":
            name = item.options["model"]
            record["checkpoint_sha256"] = ctx.checkpoint_digest(name)
            retrained.add(name)
        store.append(record)
        say(f"    done in {time.time() - started:.1f} s")
        ran.append(item.id)
    distributed.barrier()
    report_path = None
    if report and distributed.is_main_process():
        from ridgeline.study.report import write_report

        report_path = write_report(run_dir)
    return StudyOutcome(run_dir, report_path, ran, skipped)
