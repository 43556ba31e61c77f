"""Study configuration: a TOML file validated by pydantic.

A study names its data, its models (each with an architecture and an init seed), how they
are trained, and the measurements to run. Unknown keys are errors, with the key's path.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ridgeline.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["StudyConfig", "DataConfig", "ModelConfig", "TrainingConfig", "MeasurementConfig",
           "load_config", "default_config_path", "apply_preset", "config_from_dict"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    name: str = "mnist1d"
    args: dict[str, Any] = Field(default_factory=dict)
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)


class TrainingConfig(_Strict):
    optimizer: str = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(20, ge=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    loss: str = "cross_entropy"
    scheduler: Literal["cosine", "linear"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Strict):
    name: str
    factory: str = "mlp"
    args: dict[str, Any] = Field(default_factory=dict)
    init_seed: int = 0
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError(f"model name {value!r} must be letters, digits, '-' or '_'")
        return value


class MeasurementConfig(BaseModel):
    """One measurement: its kind, an optional id, and the kind's own options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str
    id: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StudyConfig(_Strict):
    name: str = "study"
    description: str = ""
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    models: list[ModelConfig] = Field(default_factory=list)
    measurements: list[MeasurementConfig] = Field(default_factory=list)
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sweep: dict[str, Any] | None = None  # validated by ridgeline.sweep (grid × seeds)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"the study has no model named {name!r}; its models are "
                          f"{[m.name for m in self.models]}.")

    def training_for(self, name: str) -> TrainingConfig:
        """The global training settings with the model's own overrides applied."""
        overrides = self.model(name).training
        try:
            return TrainingConfig(**{**self.training.model_dump(), **overrides})
        except ValidationError as exc:
            raise ConfigError(f"training overrides of model {name!r}: {_explain(exc)}") from exc


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        else:
            parts.append(f"'{where}': {err['msg']}")
    return "; ".join(parts)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            node = next((m for m in node if m.get("name") == key or m.get("id") == key
                         or m.get("kind") == key), None)
            if node is None:
                raise ConfigError(f"preset key '{dotted}': no entry named {key!r}.")
        else:
            node = node.setdefault(key, {})
    if isinstance(node, list):
        raise ConfigError(f"preset key '{dotted}' must name a field, not a list.")
    node[keys[-1]] = value


def apply_preset(raw: dict, preset: str | None) -> dict:
    """Apply ``[presets.NAME]`` dotted overrides (``"training.epochs" = 3``; list entries are
    addressed by their name, id or kind: ``"models.a.args.widths" = [64]``)."""
    if preset is None:
        return raw
    presets = raw.get("presets", {})
    if preset not in presets:
        raise ConfigError(f"the config has no preset {preset!r}; its presets are {sorted(presets)}.")
    out = copy.deepcopy(raw)
    for dotted, value in presets[preset].items():
        _set_dotted(out, dotted, value)
    return out


def config_from_dict(raw: dict, *, preset: str | None = None, source: str = "config") -> StudyConfig:
    raw = apply_preset(raw, preset)
    try:
        config = StudyConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(f"{source} is not a valid study config: {_explain(exc)}.") from exc
    names = [m.name for m in config.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: model names must be unique, got {names}.")
    return config


def default_config_path() -> Path:
    return Path(__file__).with_name("default.toml")


def load_config(path: str | Path | None = None, *, preset: str | None = None) -> StudyConfig:
    """Read and validate a study TOML file (the built-in default study when ``None``)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return config_from_dict(raw, preset=preset, source=str(path))


def dump_toml(data: dict) -> str:
    """A small TOML writer for configs (tables, arrays of tables, scalars, lists, dicts)."""
    import json

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k) if not k.isidentifier() else k} = {scalar(x)}"
                                    for k, x in v.items() if x is not None) + " }"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []
    simple = {k: v for k, v in data.items() if not isinstance(v, (dict, list)) or
              (isinstance(v, list) and not any(isinstance(x, dict) for x in v))}
    for k, v in simple.items():
        if v is not None:
            lines.append(f"{k} = {scalar(v)}")
    for k, v in data.items():
        if isinstance(v, dict) and k not in simple:
            lines.append(f"\n[{k}]")
            for kk, vv in v.items():
                if vv is not None:
                    key = kk if kk.replace("_", "").isalnum() else json.dumps(kk)
                    lines.append(f"{key} = {scalar(vv)}")
        elif isinstance(v, list) and k not in simple:
            for item in v:
                lines.append(f"\n[[{k}]]")
                for kk, vv in item.items():
                    if vv is not None:
                        lines.append(f"{kk} = {scalar(vv)}")
    return "\n".join(lines) + "\n"
