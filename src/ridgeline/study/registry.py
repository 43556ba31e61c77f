"""The open registry of measurement kinds.

An instrument adds a measurement by writing a module in ``ridgeline/study/measurements/``
that calls :func:`register_measurement`; the runner and the report discover it without any
change of their own.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ridgeline.errors import ConfigError

__all__ = ["MeasurementKind", "register_measurement", "get_measurement", "measurement_kinds",
           "Options"]


class Options(BaseModel):
    """Base class for a measurement's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def resume_key(self) -> dict[str, Any]:
        """What a record of these options depends on beyond the options as written (e.g. a
        library default that they leave open); when not empty it enters the measurement's
        fingerprint, so a record computed under another value is redone on resume."""
        return {}


@dataclass(frozen=True)
class MeasurementKind:
    """A kind of measurement.

    Attributes
    ----------
    name : str
    run : callable (context, options) -> dict
        Does the work; returns a JSON-safe result (tensors are converted on write).
    options : type[Options]
        Validates the measurement's options from the config.
    report : callable (record) -> str, optional
        An HTML fragment (figures embedded) for the record, built from the record alone.
    summary : callable (record) -> dict, optional
        A flat row of headline numbers for the report's summary table.
    description : str
    check : callable (config, options) -> list of str, optional
        Problems of the options against the study (e.g. a choice the options class cannot
        express); run by :func:`ridgeline.study.validate.validate_study` before any work.
    """

    name: str
    run: Callable[[Any, Any], dict]
    options: type[Options]
    report: Callable[[dict], str] | None = None
    summary: Callable[[dict], dict] | None = None
    description: str = ""
    check: Callable[[Any, Any], list[str] | None] | None = None

    def parse_options(self, raw: dict, where: str) -> Options:
        try:
            return self.options(**raw)
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                parts.append(f"unknown option '{key}'" if err["type"] == "extra_forbidden"
                             else f"'{key}': {err['msg']}")
            allowed = sorted(self.options.model_fields)
            raise ConfigError(f"{where} (kind '{self.name}'): {'; '.join(parts)}. "
                              f"Options of '{self.name}' are {allowed}.") from exc


_REGISTRY: dict[str, MeasurementKind] = {}
_discovered = False


def register_measurement(name: str, *, options: type[Options] = Options,
                         report: Callable[[dict], str] | None = None,
                         summary: Callable[[dict], dict] | None = None, description: str = "",
                         check: Callable[[Any, Any], list[str] | None] | None = None):
    """Decorator registering ``run(context, options) -> dict`` as measurement ``name``."""

    def decorate(run: Callable[[Any, Any], dict]):
        _REGISTRY[name] = MeasurementKind(name, run, options, report, summary,
                                          description or (run.__doc__ or "").strip().split("\n")[0],
                                          check)
        return run

    return decorate


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    from ridgeline.study import measurements

    for info in pkgutil.iter_modules(measurements.__path__):
        importlib.import_module(f"{measurements.__name__}.{info.name}")
    _discovered = True


def measurement_kinds() -> dict[str, MeasurementKind]:
    _discover()
    return dict(_REGISTRY)


def get_measurement(name: str) -> MeasurementKind:
    kinds = measurement_kinds()
    if name not in kinds:
        raise ConfigError(f"unknown measurement kind {name!r}; known kinds are {sorted(kinds)}.")
    return kinds[name]
