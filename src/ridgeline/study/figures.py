"""Helpers for report sections: figures as inline SVG, tables, number formatting."""

from __future__ import annotations

import html
import io
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ridgeline.plotting import new_figure

__all__ = ["figure_html", "table_html", "fmt", "new_figure", "section_html"]


def figure_html(fig, *, caption: str | None = None) -> str:
    """The figure as inline SVG (self-contained); a figure made through pyplot (say, by a
    plugin's report) is closed afterwards (:func:`new_figure`'s need no closing)."""
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    pyplot = sys.modules.get("matplotlib.pyplot")  # imported by someone: it may hold the figure
    if pyplot is not None:
        pyplot.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.find("<svg"):]
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="plot">{svg}{cap}</figure>'


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An HTML table of dict rows (union of keys as columns, in first-seen order)."""
    if not rows:
        return "<p><em>no rows</em></p>"
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(row.get(c))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def section_html(title: str, body: str, *, anchor: str | None = None) -> str:
    anchor_attr = f' id="{html.escape(anchor)}"' if anchor else ""
    return f"<section{anchor_attr}><h2>{html.escape(title)}</h2>{body}</section>"
