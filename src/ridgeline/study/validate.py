"""Check a whole study before any work: every name resolves, every option is valid.

:func:`validate_study` asks the registries (datasets, model factories, training methods,
measurement kinds) whether each name in the config resolves, binds every argument table
against the function it is passed to, builds every model, sets up (without a step) every
model's training, and checks every measurement's options, including the study models it
names. It reports every problem at once, each with its field and the valid choices, before
the run folder is created.

Model references in measurement options follow one convention: an option named ``model``,
``models``, ``others`` or ending in ``_model``/``_models`` names study models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ridgeline.errors import ConfigError, RidgelineError
from ridgeline.study.config import ModelConfig, StudyConfig

__all__ = ["validate_study", "model_references", "SPLITS"]

SPLITS = ("train", "test")


def _choices(names) -> str:
    return ", ".join(repr(n) for n in sorted(names))


# ----------------------------------------------------------------------------- data
def _check_data(config: StudyConfig) -> list[str]:
    """The dataset's name (built-in, or user code ``"package.module:callable"``) and its
    arguments against the data function's signature, without loading anything."""
    from ridgeline.data import DATASETS, check_dataset
    from ridgeline.usercode import is_import_path, resolve_callable

    cfg = config.data
    try:
        if is_import_path(cfg.name):
            resolve_callable(cfg.name, "data function")
        elif cfg.name not in DATASETS:
            return [f"data.name: unknown dataset {cfg.name!r}; the datasets are "
                    f"{_choices(DATASETS)}, or your own data function 'package.module:callable'"]
    except RidgelineError as exc:
        return [f"data.name: {exc}"]
    try:
        check_dataset(cfg.name, **cfg.args)
    except RidgelineError as exc:
        return [f"data.args: {exc}"]
    return []


# ----------------------------------------------------------------------------- models
def _build(model: ModelConfig, build: Callable[[str], torch.nn.Module] | None
           ) -> tuple[torch.nn.Module | None, list[str]]:
    """The model built as the run will build it (``build``: a context's), or the problems."""
    from ridgeline.models import FACTORIES, build_model, check_model
    from ridgeline.usercode import is_import_path, resolve_callable

    where = f"models.{model.name}"
    try:
        if is_import_path(model.factory):
            resolve_callable(model.factory, "model factory")
        elif model.factory not in FACTORIES:
            return None, [f"{where}.factory: unknown model factory {model.factory!r}; the "
                          f"factories are {_choices(FACTORIES)}, or your own "
                          "'package.module:callable'"]
    except RidgelineError as exc:
        return None, [f"{where}.factory: {exc}"]
    try:
        check_model(model.factory, **model.args)
    except RidgelineError as exc:
        return None, [f"{where}.args: {exc}"]
    try:
        if build is not None:
            return build(model.name), []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.init_seed)
            return build_model(model.factory, **model.args), []
    except Exception as exc:  # noqa: BLE001 - any failure to build is a config problem
        text = str(exc) if isinstance(exc, RidgelineError) else f"{type(exc).__name__}: {exc}"
        return None, [f"{where}.args: factory {model.factory!r} cannot build the model from "
                      f"{model.args}: {text}"]


def _check_training(config: StudyConfig, model: ModelConfig, built: torch.nn.Module | None,
                    data) -> list[str]:
    """The model's training settings, set up for real on a few examples (no step taken)."""
    import importlib

    training = importlib.import_module("ridgeline.train")  # the module, not the function
    where = f"models.{model.name}"
    try:
        settings = config.training_for(model.name)
    except ConfigError as exc:
        return [str(exc).rstrip(".")]
    training._load_method_plugins()
    if settings.optimizer not in training.TRAINING_METHODS:
        field = f"{where}.training.optimizer" if "optimizer" in model.training else \
            "training.optimizer"
        return [f"{field}: unknown optimizer {settings.optimizer!r}; the optimizers are "
                f"{_choices(training.TRAINING_METHODS)}"]
    from ridgeline.losses import LOSSES

    if settings.loss not in LOSSES:
        field = f"{where}.training.loss" if "loss" in model.training else "training.loss"
        return [f"{field}: unknown loss {settings.loss!r}; the losses are {_choices(LOSSES)}"]
    if built is None or data is None:
        return []
    if settings.optimizer in ("sgd", "adam", "adamw") and not settings.options:
        return []  # nothing a setup could refuse that the config's own checks let through
    probe = data.subset(min(len(data), 8))
    try:
        training.train(copy.deepcopy(built), probe, optimizer=settings.optimizer, lr=settings.lr,
                       momentum=settings.momentum, weight_decay=settings.weight_decay, epochs=0,
                       batch_size=settings.batch_size, seed=settings.seed, loss=settings.loss,
                       scheduler=settings.scheduler, progress=False, **settings.options)
    except Exception as exc:  # noqa: BLE001 - any failure to set up is a config problem
        text = str(exc) if isinstance(exc, RidgelineError) else f"{type(exc).__name__}: {exc}"
        return [f"training of model {model.name!r}: {text}"]
    return []


def _check_fit(model: ModelConfig, built: torch.nn.Module, loss: str, data: dict) -> list[str]:
    """Every example of each split fits the model (input shape, label range, finite)."""
    from ridgeline.objective import Objective

    for split, dataset in data.items():
        try:
            Objective(built, dataset, loss)
        except RidgelineError as exc:  # the first split that does not fit says it all
            return [f"models.{model.name} on the {split} data ({model.factory}, "
                    f"{model.args}): {exc}"]
    return []


# ----------------------------------------------------------------------------- measurements
def model_references(options: Any) -> dict[str, list[str]]:
    """{option name: study model names} for a measurement's options (parsed, or a raw dict)."""
    values = options if isinstance(options, dict) else \
        {name: getattr(options, name) for name in type(options).model_fields}
    out = {}
    for name, value in values.items():
        if not (name in ("model", "models", "others") or name.endswith(("_model", "_models"))):
            continue
        if isinstance(value, str):
            out[name] = [value]
        elif isinstance(value, (list, tuple)):
            out[name] = [str(n) for n in value]
    return out


def _check_measurements(config: StudyConfig) -> list[str]:
    from ridgeline.study.registry import measurement_kinds

    kinds = measurement_kinds()
    models = [m.name for m in config.models]
    trained_explicitly: dict[str, int] = {}
    for index, entry in enumerate(config.measurements):
        if entry.kind == "train" and isinstance(entry.options.get("model"), str):
            trained_explicitly.setdefault(entry.options["model"], index)
    problems = []
    for index, entry in enumerate(config.measurements):
        where = f"measurements[{index}] ({entry.id or entry.kind!r})"
        kind = kinds.get(entry.kind)
        if kind is None:
            problems.append(f"{where}.kind: unknown measurement kind {entry.kind!r}; the kinds "
                            f"are {_choices(kinds)}")
            continue
        try:
            options = kind.parse_options(entry.options, f"measurement {entry.id or entry.kind!r}")
        except ConfigError as exc:
            problems.append(str(exc).rstrip("."))
            options = None
        for field, names in model_references(options or entry.options).items():
            for name in names:
                if name not in models:
                    problems.append(f"{where}.{field}: the study has no model {name!r}; its "
                                    f"models are {models}")
                elif trained_explicitly.get(name, -1) > index:
                    problems.append(f"{where}.{field}: model {name!r} is trained by "
                                    f"measurements[{trained_explicitly[name]}], after this one; "
                                    "move its 'train' entry before the measurements that use it")
        if options is None:
            continue
        for field in type(options).model_fields:
            value = getattr(options, field)
            if field in ("split", "splits") and value is not None:
                bad = [v for v in ([value] if isinstance(value, str) else value) if v not in SPLITS]
                if bad:
                    problems.append(f"{where}.{field}: unknown split(s) {bad}; the splits are "
                                    f"{list(SPLITS)}")
            if (field == "subset" or field.endswith("_subset")) and isinstance(value, int) \
                    and not isinstance(value, bool) and value < 1:
                problems.append(f"{where}.{field}: a subset must be at least 1 example (or "
                                f"omitted for all of them); got {value}")
        if kind.check is not None:
            try:
                problems += [f"{where}: {p}" for p in (kind.check(config, options) or [])]
            except RidgelineError as exc:
                problems.append(f"{where}: {exc}")
    return problems


# ----------------------------------------------------------------------------- entry point
def validate_study(config: StudyConfig, *, context: Any = None) -> None:
    """Raise :class:`ConfigError` listing every problem of the study, before any work.

    Parameters
    ----------
    config : StudyConfig
    context : StudyContext, optional
        Loads the data and builds the models as the run will (``context.dataset(split)``,
        ``context.build(name)``), so that the run reuses what is loaded here. With it, every
        model is also checked against every example of both splits and its training is set
        up on a few examples; without it, the checks stop at names and arguments (each model
        is still built).
    """
    problems = list(_check_data(config))
    data = None
    if not problems and context is not None:
        try:
            data = {split: context.dataset(split) for split in SPLITS}
        except RidgelineError as exc:
            problems.append(f"data ({config.data.name!r}, args {config.data.args}): {exc}")
    problems += _check_measurements(config)
    for model in config.models:
        built, found = _build(model, context.build if context is not None else None)
        problems += found
        training = _check_training(config, model, built, data["train"] if data else None)
        problems += training
        if built is not None and data is not None and not training:
            problems += _check_fit(model, built, config.training_for(model.name).loss, data)
    problems = list(dict.fromkeys(problems))  # a global setting's problem once, not per model
    if problems:
        shown = "\n  - ".join(problems)
        raise ConfigError(f"the study {config.name!r} has {len(problems)} problem"
                          f"{'s' if len(problems) > 1 else ''}; nothing was run:\n  - {shown}")
