"""Run (or resume) a sweep: expand it, hand unfinished tasks to an engine, write records.

The driver is the only writer of the run folder: workers return records and checkpoint
bytes, and the driver appends each record to ``results.jsonl`` (one fsync'd line) as its
task finishes. A task counts as done when every one of its records is there with the
task's fingerprint, so a sweep killed at any point (driver, worker or cluster) resumes
where it stopped; a record already on disk is never written twice.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ridgeline.errors import ConfigError
from ridgeline.progress import console, progress_bar
from ridgeline.study.config import StudyConfig, dump_toml
from ridgeline.study.lock import RunLock
from ridgeline.study.runner import environment
from ridgeline.study.store import ResultStore, atomic_write_text, remove_stale_temporaries
from ridgeline.study.validate import validate_study
from ridgeline.sweep.config import SweepSpec, SweepTask, _digest, expand_sweep, sweep_spec
from ridgeline.sweep.engines import Engine, make_engine
from ridgeline.sweep.kind import KIND, correlation_result, inputs_digest

__all__ = ["run_sweep", "SweepOutcome", "refresh_correlation", "is_sweep"]


@dataclass(frozen=True)
class SweepOutcome:
    run_dir: Path
    report: Path | None
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    seconds: float


def _done(task: SweepTask, latest: dict[str, dict]) -> set[str]:
    """Ids of the task's records already on disk for this exact task (same fingerprint)."""
    return {i for i in task.record_ids
            if (r := latest.get(i)) is not None and r.get("status") == "ok"
            and r.get("fingerprint") == task.fingerprint}


def is_sweep(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a sweep (its study record carries a ``sweep`` table)."""
    study = ResultStore(run_dir).latest().get("study")
    return bool(study and study.get("result", {}).get("sweep"))


def refresh_correlation(run_dir: str | Path, spec: SweepSpec | None = None,
                        seed: int | None = None) -> dict | None:
    """Append a new ``generalization_correlation`` record when the records it is computed
    from changed since the last one (or there is none); returns the latest record."""
    store = ResultStore(run_dir)
    records = store.records()
    latest = {r["id"]: r for r in records}
    study = latest.get("study", {}).get("result", {})
    if spec is None:
        spec = SweepSpec(**(study.get("sweep") or {}))
    if seed is None:
        seed = int(study.get("config", {}).get("seed", 0))
    current = latest.get(KIND)
    if current is not None and current.get("result", {}).get("inputs") == inputs_digest(records):
        return current
    if not any(r["kind"] == "sweep_model" and r.get("status") == "ok" for r in latest.values()):
        return current
    started = time.time()
    result = correlation_result(records, resamples=spec.bootstrap, confidence=spec.confidence,
                                seed=seed)
    record = {"id": KIND, "kind": KIND, "status": "ok",
              "options": {"bootstrap": spec.bootstrap, "confidence": spec.confidence},
              "started": started, "duration_s": time.time() - started, "result": result}
    store.append(record)
    return record


def run_sweep(config: StudyConfig, run_dir: str | Path | None = None, *,
              engine: str | Engine = "local", workers: int | None = None,
              address: str | None = None, gpus_per_task: float = 0.0, progress: bool = True,
              report: bool = True, config_text: str | None = None) -> SweepOutcome:
    """Run (or resume) the sweep of ``config`` in ``run_dir`` (default ``runs/<name>``).

    Every task is validated before any work and before the run folder is created; then the
    unfinished tasks go to the engine (``"local"``, ``"ray"`` or an :class:`Engine`), the
    driver appends their records as they finish, and at the end writes the
    ``generalization_correlation`` record and ``report.html``.
    """
    began = time.perf_counter()
    spec = sweep_spec(config)
    tasks = expand_sweep(config, spec)
    _validate_studies(tasks)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a folder for the sweep's results.")
    store = ResultStore(run_dir)
    latest = store.latest()
    previous = latest.get("study", {}).get("result")
    if previous is not None and (not previous.get("sweep") or previous.get("name") != config.name):
        what = "sweep" if previous.get("sweep") else "study"
        raise ConfigError(f"{run_dir} holds the {what} {previous.get('name')!r}, not the sweep "
                          f"{config.name!r}; give another --out (results of different runs "
                          "must not mix).")
    pending = [t for t in tasks if _done(t, latest) != set(t.record_ids)]
    skipped = [t.id for t in tasks if t not in pending]
    runner = engine if isinstance(engine, Engine) else (
        make_engine(engine, workers=workers, address=address, gpus_per_task=gpus_per_task)
        if pending else None)
    say = console().print if progress else (lambda *a, **k: None)
    ran: list[str] = []
    failed: dict[str, str] = {}
    stack = contextlib.ExitStack()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(RunLock(run_dir))  # a second driver on this folder is refused
        _clean_up(run_dir, store, say)
        latest = store.latest()  # again, now that no other driver can write
        pending = [t for t in tasks if _done(t, latest) != set(t.record_ids)]
        skipped = [t.id for t in tasks if t not in pending]
        if pending and runner is None:
            runner = make_engine(engine, workers=workers, address=address,
                                 gpus_per_task=gpus_per_task)
        text = config_text or dump_toml(config.model_dump(mode="json", exclude_none=True))
        atomic_write_text(run_dir / "config.toml", text)
        previous = latest.get("study", {}).get("result", {})
        if previous.get("config") != config.model_dump(mode="json"):  # first run, or edited
            store.append({"id": "study", "kind": "study", "status": "ok",
                          "result": {"name": config.name, "description": config.description,
                                     "config": config.model_dump(mode="json"),
                                     "config_text": text, "environment": environment(),
                                     "sweep": spec.model_dump(mode="json")}})
        by_id = {t.id: t for t in pending}
        if pending:
            say(f"[bold cyan]sweep[/] {len(tasks)} models: {len(pending)} to run, "
                f"{len(skipped)} already done ({runner.describe() if runner else ''})")
        with progress_bar(len(pending), "sweep", progress) as bar:
            for result in (runner.map(pending) if pending and runner else ()):
                task = by_id[result.task_id]
                if result.error is not None:
                    failed[task.id] = result.error
                    store.append({"id": f"model:{task.id}", "kind": "sweep_model",
                                  "status": "error", "fingerprint": task.fingerprint,
                                  "error": result.error,
                                  "sweep": {"task": task.id, "settings": task.settings}})
                    say(f"[red]task {task.id} {task.settings} failed:[/] {result.error}")
                else:
                    for name, data in result.checkpoints.items():
                        _write_bytes(run_dir / "checkpoints" / name, data)
                    done = _done(task, store.latest())
                    for record in result.records:
                        if record["id"] not in done:
                            store.append({**record, "worker": {"host": result.host,
                                                               "pid": result.pid,
                                                               "seconds": result.seconds}})
                    ran.append(task.id)
                bar.advance(1, info=task.id)
        refresh_correlation(run_dir, spec, config.seed)
        report_path = None
        if report:
            from ridgeline.sweep.report import write_sweep_report

            report_path = write_sweep_report(run_dir)
    finally:
        if runner is not None and not isinstance(engine, Engine):
            runner.close()
        stack.close()
    return SweepOutcome(run_dir, report_path, ran, skipped, failed, time.perf_counter() - began)


def _clean_up(run_dir: Path, store: ResultStore, say) -> None:
    """Holding the lock: delete the temporary files of writes a killed driver left, and
    move unreadable lines out of results.jsonl (their work is redone)."""
    removed = remove_stale_temporaries(run_dir)
    if removed:
        say(f"removed {len(removed)} unfinished temporary file(s) of an interrupted run")
    moved, where = store.quarantine()
    if moved:
        say(f"[yellow]{moved} unreadable line(s) of results.jsonl moved to {where}; their "
            "work is redone[/]")


def _validate_studies(tasks: list[SweepTask]) -> None:
    """The study layer's whole-study validation (names, arguments, models built) of each
    distinct task config, before any work and before the run folder is created."""
    seen: set[str] = set()
    for task in tasks:
        study = json.loads(json.dumps(task.study))
        model = study["models"][0]
        shape = {**study, "name": None, "models": [{**model, "name": None, "init_seed": None,
                                                    "training": {**model.get("training", {}),
                                                                 "seed": None}}]}
        key = _digest(shape)
        if key in seen:
            continue
        seen.add(key)
        study["measurements"] = [{"kind": p.kind, "id": p.id, **p.options} for p in task.plan[1:]]
        try:
            validate_study(StudyConfig(**study))
        except ConfigError as exc:
            raise ConfigError(f"sweep point {task.settings} (model {task.base_model!r}): "
                              f"{exc}") from exc


def _write_bytes(path: Path, data: bytes) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
