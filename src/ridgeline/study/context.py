"""What a measurement sees: the study's data, its models and where to write."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ridgeline.data import Dataset, load_dataset
from ridgeline.errors import CheckpointError
from ridgeline.models import build_model
from ridgeline.study.config import StudyConfig
from ridgeline.study.store import ResultStore

__all__ = ["StudyContext", "checkpoint_digest"]


def checkpoint_digest(path: Path) -> str | None:
    """SHA-256 (16 hex digits) of a checkpoint file's bytes, or None when it is missing.

    A record stores the digests of the checkpoints it was computed from; a resumed study
    redoes it when one of them changed or is gone."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()[:16]


class StudyContext:
    """Handles to a study's data and models for measurements.

    Attributes
    ----------
    config : StudyConfig
    run_dir : Path
    progress : bool
        Whether long loops should show progress bars.
    """

    def __init__(self, config: StudyConfig, run_dir: Path, *, progress: bool = True,
                 store: ResultStore | None = None) -> None:
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        self.store = store or ResultStore(run_dir)
        self.used_checkpoints: dict[str, str | None] = {}
        self._digests: dict[tuple, str] = {}

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.config.models]

    @functools.cache  # noqa: B019 - one context per study run
    def dataset(self, split: str = "train") -> Dataset:
        """The study's dataset split (``"train"`` or ``"test"``), subset as configured."""
        cfg = self.config.data
        data = load_dataset(cfg.name, split, **cfg.args)
        limit = cfg.train_subset if split == "train" else cfg.test_subset
        return data.subset(limit) if limit is not None else data

    def checkpoint_path(self, name: str, *, initial: bool = False) -> Path:
        suffix = ".init" if initial else ""
        return self.run_dir / "checkpoints" / f"{name}{suffix}.safetensors"

    def build(self, name: str) -> nn.Module:
        """A freshly initialised model ``name`` (its init seed; global RNG untouched)."""
        cfg = self.config.model(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return build_model(cfg.factory, **cfg.args)

    def checkpoint_digest(self, name: str) -> str | None:
        """:func:`checkpoint_digest` of model ``name``'s trained checkpoint (cached while the
        file's size and modification time stay the same)."""
        path = self.checkpoint_path(name)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (name, stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key not in self._digests:
            self._digests[key] = checkpoint_digest(path)
        return self._digests[key]

    def initial_model(self, name: str) -> nn.Module:
        """Model ``name`` at initialisation (before training)."""
        return self.build(name).eval()

    def model(self, name: str) -> nn.Module:
        """Model ``name`` after training, loaded from its checkpoint."""
        from ridgeline.train import load

        path = self.checkpoint_path(name)
        if not path.exists():
            raise CheckpointError(f"model {name!r} has no checkpoint at {path}: it was removed "
                                  "while the study ran. Run the study again: it retrains models "
                                  "whose checkpoint is missing and redoes what used them.")
        self.used_checkpoints[name] = self.checkpoint_digest(name)
        return load(path, self.build(name))

    def record(self, measurement_id: str) -> dict[str, Any] | None:
        """The latest record of another measurement (e.g. a model's training history)."""
        return self.store.latest().get(measurement_id)
