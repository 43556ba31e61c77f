"""Matplotlib helpers shared by instruments (``.plot``) and the study report.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through
``matplotlib.pyplot``: pyplot keeps every figure it creates open until it is closed, so a
library that made its figures there would leak one per call (and matplotlib warns past 20).
A figure made here is freed with its last reference, needs no backend (``fig.savefig``
writes PNG, SVG or PDF), and never changes the user's backend. In a notebook, show a
result's figure with ``ax.figure`` (the value of the last line of a cell is displayed) or
``IPython.display.display(ax.figure)``.
"""

from __future__ import annotations

__all__ = ["new_figure", "new_axes"]


def new_figure(width: float = 6.0, height: float = 3.6, ncols: int = 1):
    """A matplotlib figure of ``ncols`` axes side by side, not registered with pyplot, and
    its axes (one Axes, or a list of them when ``ncols > 1``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, (axes[0, 0] if ncols == 1 else list(axes[0]))


def new_axes(ax=None, width: float = 5.0, height: float = 3.5):
    """``ax`` when given, else the axes of a new figure (:func:`new_figure`): what a result's
    ``.plot(ax=None)`` draws on."""
    return ax if ax is not None else new_figure(width, height)[1]
