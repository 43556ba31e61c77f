"""results.jsonl: one finished measurement per line, appended atomically.

A line is written whole with one ``write`` and ``fsync``ed. On reading, a line that is not a
UTF-8 JSON record (a write cut short by a crash, bytes appended by something else) is
skipped and counted in :attr:`ResultStore.unreadable`; its measurement is simply redone.
:meth:`ResultStore.quarantine` moves such lines out of the file, so it stays a clean JSON
Lines file. A complete record that only lacks its final newline is a record.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ridgeline import distributed
from ridgeline._files import atomic_write_bytes
from ridgeline._json import to_jsonable

__all__ = ["ResultStore", "to_jsonable", "atomic_write_text", "remove_stale_temporaries"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file atomically (temp file, fsync, rename); rank 0 only.

    The temporary file is removed if anything fails; one left by a killed process is
    removed by :func:`remove_stale_temporaries` when the next run takes the folder's lock.
    """
    if not distributed.is_main_process():
        return
    atomic_write_bytes(path, text.encode("utf-8"))


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # tempfile.mkstemp's
_RUN_FILES = ("report.html", "config.toml", "results.jsonl")


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the ``.<name>.XXXXXXXX.tmp`` files of atomic writes that a killed process left:
    of ``report.html``, ``config.toml`` and ``results.jsonl`` in ``run_dir``, and of any
    checkpoint in ``run_dir/checkpoints``. Only call this while holding the run's lock (no
    other writer can be mid-write). Returns the removed paths."""
    removed = []
    run_dir = Path(run_dir)
    for folder, names in ((run_dir, _RUN_FILES), (run_dir / "checkpoints", None)):
        if not folder.is_dir():
            continue
        for tmp in folder.glob(".*.tmp"):
            match = _TEMPORARY.match(tmp.name)
            if match is None or (names is not None and match["name"] not in names):
                continue
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


class ResultStore:
    """Reads and appends ``results.jsonl`` in a run directory.

    Attributes
    ----------
    unreadable : int
        Lines skipped by the last :meth:`records` call (not UTF-8, not a JSON object with
        an ``id``, or cut short).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "results.jsonl"
        self.unreadable = 0

    def _scan(self) -> tuple[list[tuple[dict, bytes]], list[bytes]]:
        """(record, raw line) for every readable line, and the unreadable raw lines."""
        if not self.path.exists():
            return [], []
        good, bad = [], []
        data = self.path.read_bytes()
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append(raw)
                continue
            if isinstance(record, dict) and "id" in record:
                good.append((record, raw))
            else:
                bad.append(raw)
        # A line without its newline that parses is complete: append() writes a record's
        # JSON in one piece, so a cut-short write never parses (its closing brace is lost).
        return good, bad

    def records(self) -> list[dict]:
        """Every complete record, in file order; unreadable lines are skipped and counted
        in :attr:`unreadable`."""
        good, bad = self._scan()
        self.unreadable = len(bad)
        return [record for record, _ in good]

    def latest(self) -> dict[str, dict]:
        """The newest record for each id."""
        return {r["id"]: r for r in self.records()}

    def quarantine(self) -> tuple[int, Path | None]:
        """Move unreadable lines out of results.jsonl into ``results.unreadable`` (appended,
        raw bytes, one block per call) and rewrite results.jsonl atomically with the readable
        records only. Rank 0, while holding the run's lock. Returns (lines moved, where)."""
        if not distributed.is_main_process():
            return 0, None
        good, bad = self._scan()
        if not bad:
            return 0, None
        where = self.run_dir / "results.unreadable"
        header = f"# {len(bad)} unreadable lines moved out of results.jsonl at " \
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, header + b"".join(raw + b"\n" for raw in bad))
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write_text(self.path, "".join(raw.decode("utf-8") + "\n" for _, raw in good))
        return len(bad), where

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
                    prefix = "\n"  # end the last line (complete or cut short) before this one
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (prefix + line).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
