"""The ``[sweep]`` table of a study config and its grid × seeds expansion into tasks.

A sweep trains every model of the study once for each point of a hyperparameter grid and
each seed, then runs the sweep's measurements on each trained model. Every (point, seed,
study model) is one *task* with a stable id derived from its settings alone, so adding
values to the grid or re-running after a crash keeps the ids of finished work.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ridgeline._json import to_jsonable
from ridgeline.errors import ConfigError
from ridgeline.study.config import (
    DataConfig,
    MeasurementConfig,
    ModelConfig,
    StudyConfig,
    TrainingConfig,
)
from ridgeline.study.registry import get_measurement

__all__ = ["SweepSpec", "SweepTask", "PlannedRecord", "sweep_spec", "expand_sweep",
           "valid_grid_keys", "PAIR_KINDS"]

#: Kinds that compare two or more models: they have no meaning on one model of a sweep.
PAIR_KINDS = frozenset({"connectivity", "barrier_prediction", "transport", "merge"})
#: Kinds the sweep itself writes (never listed under ``[[sweep.measurements]]``).
RESERVED_KINDS = frozenset({"train", "generalization_correlation"})


class SweepSpec(BaseModel):
    """``[sweep]``: seeds, a grid of dotted config keys to lists, measurements per model.

    Attributes
    ----------
    seeds : list of int
        Each seed s sets every model's ``init_seed`` and ``training.seed`` to s.
    grid : dict
        Dotted config key → list of values, e.g. ``"training.lr" = [0.02, 0.1]``.
    measurements : list
        Measurements applied to every trained model (options as in studies, without
        ``model``/``models``: the sweep fills them in).
    threads : int
        ``torch.set_num_threads`` inside each task (1 keeps results identical everywhere).
    checkpoints : bool
        Copy each trained model's checkpoint back to ``<run>/checkpoints/``.
    bootstrap : int
        Bootstrap resamples for the intervals of the correlation record.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    seeds: list[int] = Field(default_factory=lambda: [0])
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    measurements: list[MeasurementConfig] = Field(default_factory=list)
    threads: int = Field(1, ge=1)
    checkpoints: bool = True
    bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)


@dataclass(frozen=True)
class PlannedRecord:
    """One measurement of a task: its record id, kind and validated options."""

    id: str
    kind: str
    options: dict


@dataclass(frozen=True)
class SweepTask:
    """One trained model of the sweep and its measurements (the unit of work of an engine).

    Attributes
    ----------
    id : str
        Stable id: the base model's name and a hash of (base model, grid point, seed).
    base_model : str
        The study model it was expanded from.
    settings : dict
        The grid point (dotted key → value) and ``seed``.
    study : dict
        A one-model study config (JSON) the task runs.
    plan : tuple of PlannedRecord
        ``train:<id>`` first, then the sweep's measurements.
    fingerprint : str
        Changes whenever anything the task computes from changes.
    threads, checkpoints
    """

    id: str
    base_model: str
    settings: dict
    study: dict
    plan: tuple[PlannedRecord, ...]
    fingerprint: str
    threads: int = 1
    checkpoints: bool = True
    record_ids: tuple[str, ...] = field(default=())


def sweep_spec(config: StudyConfig) -> SweepSpec:
    """The validated ``[sweep]`` table of ``config`` (a ConfigError when absent or bad)."""
    raw = config.sweep
    if raw is None:
        raise ConfigError(f"study {config.name!r} has no [sweep] table; add one with `seeds` "
                          "and a `[sweep.grid]` (see docs/sweeps.md), or run it with "
                          "`ridgeline study`.")
    try:
        return SweepSpec(**raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in ("sweep", *err["loc"]))
            parts.append(f"unknown key '{where}'" if err["type"] == "extra_forbidden"
                         else f"'{where}': {err['msg']}")
        raise ConfigError(f"the [sweep] table is not valid: {'; '.join(parts)}. Its keys are "
                          f"{sorted(SweepSpec.model_fields)}.") from exc


def valid_grid_keys(config: StudyConfig) -> list[str]:
    """The dotted keys a grid may vary (``*`` stands for any key of a free-form table)."""
    training = sorted(f for f in TrainingConfig.model_fields if f != "options")
    keys = ["seed"]
    keys += [f"data.{f}" for f in sorted(DataConfig.model_fields) if f != "args"] + ["data.args.*"]
    keys += [f"training.{f}" for f in training] + ["training.options.*"]
    for m in config.models:
        keys += [f"models.{m.name}.{f}" for f in ("factory", "init_seed")]
        keys += [f"models.{m.name}.args.*"]
        keys += [f"models.{m.name}.training.{f}" for f in training]
        keys += [f"models.{m.name}.training.options.*"]
    return keys


def _check_key(key: str, config: StudyConfig) -> None:
    parts = key.split(".")
    training = set(TrainingConfig.model_fields)

    def training_ok(rest: list[str]) -> bool:
        if not rest or rest[0] not in training:
            return False
        return len(rest) >= 2 if rest[0] == "options" else len(rest) == 1

    head, rest = parts[0], parts[1:]
    if head == "seed":
        ok = not rest
    elif head == "data":
        ok = bool(rest) and rest[0] in DataConfig.model_fields and (
            len(rest) >= 2 if rest[0] == "args" else len(rest) == 1)
    elif head == "training":
        ok = training_ok(rest)
    elif head == "models":
        names = [m.name for m in config.models]
        if not rest or rest[0] not in names:
            raise ConfigError(f"grid key '{key}': the study has no model "
                              f"{rest[0] if rest else ''!r}; its models are {names}.")
        sub = rest[1:]
        fields = set(ModelConfig.model_fields) - {"name"}
        ok = bool(sub) and sub[0] in fields and (
            len(sub) >= 2 if sub[0] == "args" else
            training_ok(sub[1:]) if sub[0] == "training" else len(sub) == 1)
    else:
        ok = False
    if not ok:
        raise ConfigError(f"grid key '{key}' names no config field. Valid keys are: "
                          f"{', '.join(valid_grid_keys(config))}.")


def _set(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    if parts[0] == "models":
        node = next(m for m in tree["models"] if m["name"] == parts[1])
        parts = parts[2:]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)


def _digest(value: Any, n: int = 16) -> str:
    text = json.dumps(to_jsonable(value), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _bind(entry: MeasurementConfig, model: str, index: int) -> tuple[str, dict, dict]:
    """The measurement's record id for one model of the sweep, its options, and the library
    defaults those options leave open (``Options.resume_key``)."""
    kind = get_measurement(entry.kind)
    label = entry.id or entry.kind
    if entry.kind in RESERVED_KINDS:
        raise ConfigError(f"sweep measurement #{index} has kind {entry.kind!r}, which the sweep "
                          "runs itself (every model is trained, and the correlation record is "
                          "written at the end); remove it from [[sweep.measurements]].")
    if entry.kind in PAIR_KINDS or getattr(kind.options, "needs_pair", False):
        raise ConfigError(f"sweep measurement {label!r}: kind {entry.kind!r} compares a pair of "
                          "models, but a sweep measures each trained model on its own. Run it "
                          "in a study ([[measurements]] with models = [A, B]) instead.")
    options = dict(entry.options)
    for name in ("model", "models"):
        if name in options:
            raise ConfigError(f"sweep measurement {label!r} sets {name!r}; a sweep applies each "
                              "measurement to every trained model, so remove it.")
    fields = kind.options.model_fields
    if "models" in fields:
        options["models"] = [model]
    elif "model" in fields:
        options["model"] = model
    parsed = kind.parse_options(options, f"sweep measurement {label!r}")
    return f"{label}:{model}", parsed.model_dump(mode="json"), parsed.resume_key()


def expand_sweep(config: StudyConfig, spec: SweepSpec | None = None) -> list[SweepTask]:
    """Every task of the sweep (grid × seeds × study models), validated before any work.

    Raises ConfigError for an empty grid or seed list, a grid key that names no config
    field, values that make an invalid config, and measurements that need a pair of models.
    """
    spec = spec if spec is not None else sweep_spec(config)
    if not spec.grid or any(len(v) == 0 for v in spec.grid.values()):
        empty = [k for k, v in spec.grid.items() if not v]
        raise ConfigError("the sweep grid is empty" + (f" (no values for {empty})" if empty else "")
                          + "; give [sweep.grid] at least one key with a list of values, e.g. "
                          '"training.lr" = [0.02, 0.1].')
    if not spec.seeds:
        raise ConfigError("[sweep] seeds is empty; give at least one seed, e.g. seeds = [0, 1].")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"[sweep] seeds must be distinct; got {spec.seeds}.")
    if not config.models:
        raise ConfigError("a sweep needs at least one [[models]] entry to expand.")
    for key in spec.grid:
        _check_key(key, config)
    base = config.model_dump(mode="json")
    for key in ("sweep", "measurements", "presets"):
        base.pop(key, None)
    keys = list(spec.grid)
    tasks: list[SweepTask] = []
    seen: dict[str, dict] = {}
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        point = dict(zip(keys, values))
        for seed in spec.seeds:
            raw = copy.deepcopy(base)
            for m in raw["models"]:
                m["init_seed"] = seed
                m.setdefault("training", {})["seed"] = seed
            for key, value in point.items():
                _set(raw, key, value)
            for model in raw["models"]:
                name = model["name"]
                settings = {**point, "seed": seed}
                ident = f"{name}-{_digest({'model': name, **settings}, 10)}"
                if ident in seen:
                    raise ConfigError(f"the sweep grid repeats a setting: {settings} twice; "
                                      "give each grid key distinct values.")
                seen[ident] = settings
                single = {**raw, "name": f"{config.name}-{ident}",
                          "models": [{**model, "name": ident}], "measurements": []}
                where = f"sweep point {settings} (model {name!r})"
                try:
                    study = StudyConfig(**single)
                except ValidationError as exc:
                    from ridgeline.study.config import _explain

                    raise ConfigError(f"{where} makes an invalid config: {_explain(exc)}.") from exc
                try:
                    study.training_for(ident)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from exc
                plan = [PlannedRecord(f"train:{ident}", "train", {"model": ident})]
                defaults = {}
                for index, entry in enumerate(spec.measurements, 1):
                    rid, options, left_open = _bind(entry, ident, index)
                    plan.append(PlannedRecord(rid, entry.kind, options))
                    if left_open:
                        defaults[rid] = left_open
                if len({p.id for p in plan}) != len(plan):
                    raise ConfigError(f"sweep measurements need distinct ids; got "
                                      f"{[p.id for p in plan[1:]]} (set `id` on repeated kinds).")
                dumped = study.model_dump(mode="json")
                basis = {"study": dumped, "plan": [p.__dict__ for p in plan],
                         "threads": spec.threads}
                if defaults:  # only then: fingerprints of tasks without open defaults stay
                    basis["defaults"] = defaults
                fingerprint = _digest(basis)
                ids = (*(p.id for p in plan), f"model:{ident}")
                tasks.append(SweepTask(ident, name, settings, dumped, tuple(plan), fingerprint,
                                       spec.threads, spec.checkpoints, ids))
    return tasks
