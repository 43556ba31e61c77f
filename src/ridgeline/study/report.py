"""report.html from results.jsonl alone: self-contained (inline SVG plots, inline CSS)."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from ridgeline.study.config import dump_toml
from ridgeline.study.figures import section_html, table_html
from ridgeline.study.registry import measurement_kinds
from ridgeline.study.store import ResultStore, atomic_write_text

__all__ = ["write_report", "render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#0b3d59;color:#fff;padding:1.4rem 2rem}
header h1{margin:0 0 .3rem 0;font-size:1.6rem} header p{margin:.1rem 0;opacity:.9}
main{max-width:1100px;margin:0 auto;padding:1rem 2rem 3rem}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:1rem 1.4rem;margin:1.2rem 0}
h2{margin-top:.2rem;font-size:1.25rem;color:#0b3d59} h3{font-size:1.05rem;margin-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:right}
th{background:#eef2f6} td:first-child,th:first-child{text-align:left}
figure.plot{margin:.5rem 0} figure.plot svg{max-width:100%;height:auto}
figcaption{font-size:.85rem;color:#57606a}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:.6rem;overflow:auto;font-size:.8rem}
nav a{margin-right:.8rem} .meta{color:#57606a;font-size:.85rem}
.error{color:#b42318}
"""


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"training.epochs": 3, "models.a.args.widths": [8], ...}; list entries with a name are
    addressed by it."""
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) and "name" in x for x in tree):
        out = {}
        for item in tree:
            out.update(_flatten({k: v for k, v in item.items() if k != "name"},
                                f"{prefix}{item['name']}."))
        return out
    return {prefix.rstrip("."): tree}


def settings_differences(used: dict | None, current: dict | None) -> list[str]:
    """What differs between the settings a record was computed with and the current ones,
    as ``"training.epochs = 1 (now 2)"``; empty when either is unknown."""
    if not used or not current:
        return []
    before, now = _flatten(used), _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key, missing), now.get(key, missing)
        if old != new:
            old_text = "(absent)" if old is missing else json.dumps(old)
            new_text = "absent" if new is missing else json.dumps(new)
            out.append(f"{key} = {old_text} (now {new_text})")
    return out


def _settings_text(settings: dict) -> str:
    try:
        return dump_toml(settings)
    except (TypeError, AttributeError):  # not a shape the small TOML writer knows
        return json.dumps(settings, indent=1)


def _record_section(record: dict, kinds: dict, current: dict | None = None) -> str:
    kind = kinds.get(record["kind"])
    meta = (f'<p class="meta">kind <code>{html.escape(record["kind"])}</code> · '
            f'{record.get("duration_s", 0):.1f} s · options '
            f'<code>{html.escape(json.dumps(record.get("options", {})))}</code></p>')
    if record.get("settings") is not None:
        meta += ('<details class="meta"><summary>computed with these study settings</summary>'
                 f'<pre>{html.escape(_settings_text(record["settings"]))}</pre></details>')
    differences = settings_differences(record.get("settings"), current)
    if differences:
        meta += ('<p class="error">computed with other study settings than the current '
                 f'configuration: {html.escape("; ".join(differences))}</p>')
    if kind is None or kind.report is None:
        body = f"<pre>{html.escape(json.dumps(record.get('result'), indent=1)[:20000])}</pre>"
    else:
        try:
            body = kind.report(record)
        except Exception as exc:  # a broken section must not hide the others
            body = f'<p class="error">this section could not be drawn: {html.escape(repr(exc))}</p>'
    return section_html(record["id"], meta + body, anchor=record["id"])


def render_report(run_dir: str | Path) -> str:
    """The report's HTML for the records in ``run_dir/results.jsonl``."""
    store = ResultStore(run_dir)
    records = list({r["id"]: r for r in store.records()}.values())
    kinds = measurement_kinds()
    study = next((r for r in records if r["kind"] == "study"), None)  # the newest config
    current = study["result"].get("settings") if study else None
    measured = [r for r in records if r["kind"] != "study" and r.get("status") == "ok"]
    name = study["result"]["name"] if study else Path(run_dir).name
    description = study["result"].get("description", "") if study else ""

    summaries: dict[str, list[dict]] = {}
    for r in measured:
        kind = kinds.get(r["kind"])
        if kind is not None and kind.summary is not None:
            try:
                row = kind.summary(r)
            except Exception:  # noqa: BLE001 - summary rows are best-effort
                continue
            summaries.setdefault(r["kind"], []).append({"id": r["id"], **row})
    summary_html = "".join(f"<h3>{html.escape(k)}</h3>{table_html(rows)}"
                           for k, rows in summaries.items())
    nav = "".join(f'<a href="#{html.escape(r["id"])}">{html.escape(r["id"])}</a>' for r in measured)
    parts = [f"<header><h1>ridgeline study: {html.escape(name)}</h1>"
             f"<p>{html.escape(description)}</p>"
             f"<p>{len(measured)} measurements · report written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
             + (f'<p>{store.unreadable} unreadable line(s) of results.jsonl were skipped</p>'
                if store.unreadable else "") + "</header><main>",
             f"<nav>{nav}</nav>",
             section_html("Summary", summary_html or "<p>No measurements yet.</p>", anchor="summary")]
    parts += [_record_section(r, kinds, current) for r in measured]
    if study:
        env = study["result"].get("environment", {})
        older = [{"measurement": r["id"], "computed with": "; ".join(diff)} for r in measured
                 if (diff := settings_differences(r.get("settings"), current))]
        older_html = ("<h3>Measurements computed with other settings</h3>"
                      "<p>These records are from an earlier configuration (they are no longer "
                      "planned, or were not yet redone):</p>" + table_html(older)) if older else ""
        parts.append(section_html(
            "Configuration and environment",
            table_html([{"key": k, "value": str(v)} for k, v in env.items()]) +
            "<h3>Current configuration</h3>"
            f"<pre>{html.escape(study['result'].get('config_text', ''))}</pre>" + older_html,
            anchor="config"))
    parts.append("</main>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ridgeline · {html.escape(name)}</title><style>{_CSS}</style></head><body>"
            + "".join(parts) + "</body></html>")


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` atomically; returns its path."""
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_report(run_dir))
    return path
