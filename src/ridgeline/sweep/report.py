"""report.html of a sweep: the correlation section (τ table, one scatter per measure), then
one table row per model instead of one section per record (a sweep has hundreds)."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from ridgeline.study.figures import section_html, table_html
from ridgeline.study.registry import measurement_kinds
from ridgeline.study.report import _CSS
from ridgeline.study.store import ResultStore, atomic_write_text
from ridgeline.sweep.kind import KIND

__all__ = ["render_sweep_report", "write_sweep_report"]


def _model_rows(records: list[dict], kinds: dict) -> list[dict]:
    by_model: dict[str, dict] = {}
    for r in records:
        if r["kind"] == "sweep_model":
            task = r.get("sweep", {}).get("task") or r["id"].split(":", 1)[-1]
            row = by_model.setdefault(task, {"model": task})
            row.update({k: json.dumps(v) if isinstance(v, list) else v
                        for k, v in (r.get("sweep", {}).get("settings") or {}).items()})
            if r.get("status") == "ok":
                res = r["result"]
                row.update({"train err": res.get("train_error"), "test err": res.get("test_error"),
                            "error gap": res.get("gap_error"), "loss gap": res.get("gap_loss")})
            else:
                row["error"] = r.get("error", "failed")
    for r in records:
        task = r.get("sweep", {}).get("task")
        kind = kinds.get(r["kind"])
        if task not in by_model or r["kind"] in ("train", "sweep_model") or kind is None \
                or kind.summary is None or r.get("status") != "ok":
            continue
        try:
            summary = kind.summary(r)
        except Exception:  # noqa: BLE001 - summary rows are best-effort
            continue
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_model[task][key.replace(f" ({task})", "")] = value
    return list(by_model.values())


def render_sweep_report(run_dir: str | Path) -> str:
    records = list(ResultStore(run_dir).latest().values())
    kinds = measurement_kinds()
    study = next((r for r in records if r["kind"] == "study"), None)
    name = study["result"]["name"] if study else Path(run_dir).name
    rows = _model_rows(records, kinds)
    failed = sum(1 for r in rows if "error" in r)
    parts = [f"<header><h1>ridgeline sweep: {html.escape(name)}</h1>"
             f"<p>{html.escape(study['result'].get('description', '') if study else '')}</p>"
             f"<p>{len(rows)} models ({failed} failed) · report written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p></header><main>"]
    correlation = next((r for r in records if r["kind"] == KIND and r.get("status") == "ok"), None)
    if correlation is not None and kinds.get(KIND) is not None:
        try:
            body = kinds[KIND].report(correlation)
        except Exception as exc:  # noqa: BLE001 - the model table still shows
            body = f'<p class="error">could not draw: {html.escape(repr(exc))}</p>'
        parts.append(section_html("Sharpness and generalization", body, anchor=KIND))
    parts.append(section_html("Models", table_html(rows), anchor="models"))
    if study:
        env = study["result"].get("environment", {})
        parts.append(section_html(
            "Configuration and environment",
            table_html([{"key": k, "value": str(v)} for k, v in env.items()]) +
            f"<pre>{html.escape(study['result'].get('config_text', ''))}</pre>", anchor="config"))
    parts.append("</main>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ridgeline sweep · {html.escape(name)}</title><style>{_CSS}</style></head>"
            "<body>" + "".join(parts) + "</body></html>")


def write_sweep_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` for a sweep atomically; returns its path."""
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_sweep_report(run_dir))
    return path
