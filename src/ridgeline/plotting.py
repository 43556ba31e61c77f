"""Matplotlib helpers shared by instruments (``.plot``) and the study report."""

from __future__ import annotations

__all__ = ["new_figure"]


def new_figure(width: float = 6.0, height: float = 3.6, ncols: int = 1):
    """A matplotlib figure (Agg, no display needed) and its axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, (axes[0, 0] if ncols == 1 else list(axes[0]))
