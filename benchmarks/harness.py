"""Timing and table helpers shared by the benchmarks.

Every benchmark runs ridgeline and the peer libraries in one process on the same inputs,
checks that they agree, and prints median wall time over repeats and the peer/ridgeline
ratio (> 1 means ridgeline is faster).
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["Row", "timeit", "print_table", "peer_available", "Skip"]

console = Console(width=160)


class Skip(Exception):
    """Raised by a peer runner whose library is not installed or fails on this machine."""


@dataclass
class Row:
    case: str
    library: str
    seconds: float | None
    result: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def timeit(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """(median seconds over ``repeats`` calls, the last result), after ``warmup`` calls."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def peer_available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return False


def print_table(title: str, rows: list[Row], *, reference: str = "ridgeline") -> list[dict]:
    """Print rows grouped by case with the ratio time(peer)/time(ridgeline); return dicts."""
    table = Table(title=title)
    extra_keys: list[str] = []
    for row in rows:
        extra_keys += [k for k in row.extra if k not in extra_keys]
    for column in ("case", "library", "median time", "peer/ridgeline", "result", *extra_keys):
        table.add_column(column)
    out = []
    for row in rows:
        ref = next((r for r in rows if r.case == row.case and r.library == reference), None)
        ratio = (row.seconds / ref.seconds if ref and ref.seconds and row.seconds else None)
        table.add_row(row.case, row.library,
                      "skipped" if row.seconds is None else f"{row.seconds * 1000:.2f} ms",
                      "" if ratio is None or row.library == reference else f"{ratio:.2f}×",
                      row.result, *[str(row.extra.get(k, "")) for k in extra_keys])
        out.append({"case": row.case, "library": row.library, "seconds": row.seconds,
                    "ratio": ratio, "result": row.result, **row.extra})
    console.print(table)
    return out
