"""Progress bars (rich) that stay out of the way in CI logs and when asked to be quiet."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console: Console | None = None


def console() -> Console:
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def progress_enabled(progress: bool | None) -> bool:
    """Bars show when asked for and stderr is an interactive terminal (never under CI or
    ``RIDGELINE_QUIET=1``)."""
    if progress is False or os.environ.get("RIDGELINE_QUIET") == "1" or os.environ.get("CI"):
        return False
    return console().is_terminal


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, amount: float = 1.0, **fields: object) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=amount, **fields)  # type: ignore[arg-type]

    def describe(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)


@contextlib.contextmanager
def progress_bar(total: float | None, description: str, progress: bool | None = True
                 ) -> Iterator[_Bar]:
    """A rich progress bar, or a silent stand-in when progress is off."""
    if not progress_enabled(progress):
        yield _Bar(None, None)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console(), transient=False) as bar:
        task = bar.add_task(description, total=total, info="")
        yield _Bar(bar, task)
