"""Cache of generated datasets under the user cache directory (npz, never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """``$RIDGELINE_CACHE``, else ``$XDG_CACHE_HOME/ridgeline``, else ``~/.cache/ridgeline``."""
    root = os.environ.get("RIDGELINE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ridgeline"


def cached_arrays(name: str, key: dict, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return ``make()``'s arrays, generated once per ``key`` and kept as an ``.npz``.

    The file is written atomically; an unreadable cache file is regenerated.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
        except (OSError, ValueError):
            pass
    arrays = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs regeneration
    return arrays
