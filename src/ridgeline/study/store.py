"""results.jsonl: one finished measurement per line, appended atomically.

A line is written whole with one ``write`` and ``fsync``ed; a half-written last line (a crash
mid-write) is ignored on reading, so its measurement is simply redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ridgeline import distributed
from ridgeline._json import to_jsonable

__all__ = ["ResultStore", "to_jsonable", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file atomically (temp file, fsync, rename); rank 0 only."""
    if not distributed.is_main_process():
        return
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ResultStore:
    """Reads and appends ``results.jsonl`` in a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "results.jsonl"

    def records(self) -> list[dict]:
        """Every complete record, in file order; malformed or partial lines are skipped."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # a half-written last line
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
                    out.append(record)
        return out

    def latest(self) -> dict[str, dict]:
        """The newest record for each id."""
        return {r["id"]: r for r in self.records()}

    def append(self, record: dict) -> None:
        """Append one record as one line, durably (rank 0 only)."""
        if not distributed.is_main_process():
            return
        line = json.dumps(to_jsonable(record), allow_nan=False, separators=(",", ":")) + "\n"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        prefix = ""
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    prefix = "\n"  # seal a half-written line so it stays unreadable
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (prefix + line).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
