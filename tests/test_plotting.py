"""Figures of the library are not pyplot's: ``.plot()`` called again and again leaves
``plt.get_fignums()`` as it was (pyplot would keep every figure open and warn past 20)."""

from __future__ import annotations

import ast
import io
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

import ridgeline
from ridgeline.models import mlp
from ridgeline.plotting import new_axes, new_figure

REPEATS = 21  # more than matplotlib's figure.max_open_warning (20)


def _still_closed(draw) -> None:
    """``draw()`` REPEATS times opens no pyplot figure and raises no RuntimeWarning (such as
    matplotlib's "More than 20 figures have been opened")."""
    before = plt.get_fignums()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(REPEATS):
            ax = draw()
    assert plt.get_fignums() == before
    assert isinstance(ax.figure, Figure)
    buffer = io.BytesIO()  # the figure still saves without pyplot or a chosen backend
    ax.figure.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_figure_and_new_axes_are_not_registered_with_pyplot():
    _still_closed(lambda: new_figure(4, 3)[1])
    _still_closed(lambda: new_figure(6, 3, ncols=2)[1][0])
    _still_closed(lambda: new_axes(None, 4, 3))
    fig, ax = new_figure()
    assert new_axes(ax) is ax


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = mlp(5, [6], 3)
        trained = ridgeline.train(model, (x, y), epochs=2, batch_size=20, seed=seed,
                                  progress=False)
        models.append(model)
    return models, (x, y), trained


def test_plot_methods_called_repeatedly_open_no_pyplot_figure(pair):
    from ridgeline.connectivity import align, interpolate, layerwise_barriers
    from ridgeline.curvature import top_eigenvalues
    from ridgeline.kernels import spectrum
    from ridgeline.merge import merge

    (a, b), data, trained = pair
    results = [trained, interpolate(a, b, data, points=3), align(a, b, restarts=1),
               layerwise_barriers(a, b, data, points=3), top_eigenvalues(a, data, k=1),
               merge([a, b]), spectrum(torch.eye(4) + 0.1)]
    for result in results:
        _still_closed(result.plot)


def test_no_library_module_draws_through_pyplot():
    """Only commands (``cli.py``) may import ``matplotlib.pyplot``; a ``.plot()`` made through
    it would leak its figure (this covers the plot methods the test above does not call)."""
    package = Path(ridgeline.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n == "matplotlib.pyplot" or n.startswith("matplotlib.pyplot.") for n in names):
                offenders.append(str(path.relative_to(package)))
    assert offenders == []
