"""Measurement kind ``generalization_correlation``: how well each scalar measure of the
models ranks their generalization gap (Kendall τ, granulated τ, bootstrap intervals).

A sweep writes it at the end from ``results.jsonl`` alone (and ``ridgeline report`` brings
it up to date); in a study it can be listed like any other measurement and measures the
gap of each trained model itself.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections.abc import Iterable

from pydantic import Field

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.registry import Options, get_measurement, register_measurement
from ridgeline.sweep.correlation import correlate

__all__ = ["CorrelationOptions", "model_table", "correlation_result", "KIND"]

KIND = "generalization_correlation"
GAPS = {"error": "test error − train error", "loss": "test loss − train loss"}
_SKIP_KINDS = {"study", "train", "sweep_model", KIND}
_SKIP_WORDS = ("examples", "epochs", "parameters", "ms/step", "(s)", "time", "seconds")


class CorrelationOptions(Options):
    models: list[str] | None = None
    bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _targets(record: dict) -> list[str]:
    options = record.get("options") or {}
    if isinstance(options.get("models"), list):
        return list(options["models"])
    return [options["model"]] if isinstance(options.get("model"), str) else []


def _measures_of(name: str, records: Iterable[dict]) -> dict[str, float]:
    """Scalar headline numbers (each kind's summary row) of the records about model ``name``."""
    out: dict[str, float] = {}
    for record in records:
        if record["kind"] in _SKIP_KINDS or record.get("status") != "ok":
            continue
        targets = _targets(record)
        if name not in targets:
            continue
        try:
            kind = get_measurement(record["kind"])
        except Exception:  # noqa: BLE001 - a kind from a plugin that is not installed
            continue
        if kind.summary is None:
            continue
        try:
            row = kind.summary(record)
        except Exception:  # noqa: BLE001 - summary rows are best-effort
            continue
        label = record["id"][:-len(name) - 1] if record["id"].endswith(f":{name}") else record["id"]
        for key, value in row.items():
            if not _number(value) or any(w in key for w in _SKIP_WORDS):
                continue
            if key.endswith(f" ({name})"):
                key = key[:-len(name) - 3]
            elif key.endswith(f" {name}"):
                key = key[:-len(name) - 1]
            elif targets != [name]:
                continue  # a number about several models at once
            measure = key if label == record["kind"] else f"{label}: {key}"
            out[measure] = float(value)
    return out


def model_table(records: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per sweep model (settings, gaps, measures) from the latest records, and the
    hyperparameter axes that vary (grid keys, and ``model`` when several base models)."""
    latest = {r["id"]: r for r in records}.values()
    ok = [r for r in latest if r.get("status") == "ok"]
    rows = []
    for record in ok:
        if record["kind"] != "sweep_model":
            continue
        result = record["result"]
        name = result["model"]
        settings = dict(result.get("settings") or {})
        settings["model"] = result.get("base_model", name)
        gaps = {g: result.get(f"gap_{g}") for g in GAPS if _number(result.get(f"gap_{g}"))}
        rows.append({"id": name, "settings": settings, "gaps": gaps,
                     "measures": _measures_of(name, ok)})
    return _drop_constant(rows), _axes(rows)


def _axes(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["settings"] if k not in keys and k != "seed"]
    varying = []
    for key in keys:
        values = {json.dumps(r["settings"].get(key), sort_keys=True, default=str) for r in rows}
        if len(values) > 1:
            varying.append(key)
    return varying


def _drop_constant(rows: list[dict]) -> list[dict]:
    names = {m for r in rows for m in r["measures"]}
    constant = {m for m in names
                if len({r["measures"][m] for r in rows if m in r["measures"]}) <= 1}
    for row in rows:
        row["measures"] = {k: v for k, v in row["measures"].items() if k not in constant}
    return rows


def inputs_digest(records: list[dict]) -> str:
    """Changes when any record the correlation is computed from changes."""
    latest = {r["id"]: r for r in records if r["kind"] not in ("study", KIND)}
    basis = sorted((i, r.get("fingerprint"), r.get("status"), r.get("started"))
                   for i, r in latest.items())
    return hashlib.sha256(json.dumps(basis, default=str).encode()).hexdigest()[:16]


def correlation_result(records: list[dict], *, resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> dict:
    """The ``generalization_correlation`` result for the sweep models found in ``records``."""
    rows, axes = model_table(records)
    return {"models": rows, "axes": axes, "gaps": GAPS, "bootstrap": resamples,
            "confidence": confidence, "seed": seed, "inputs": inputs_digest(records),
            "correlations": correlate(rows, axes, resamples=resamples, confidence=confidence,
                                      seed=seed)}


def _interval(values) -> str:
    return "—" if not values else f"[{fmt(values[0], 2)}, {fmt(values[1], 2)}]"


def _tau_rows(result: dict) -> list[dict]:
    rows = []
    for measure, by_gap in result["correlations"].items():
        row: dict = {"measure": measure}
        for gap, c in by_gap.items():
            row[f"τ ({gap} gap)"] = c["tau"]
            row[f"interval ({gap})"] = _interval(c["interval"])
            row[f"granulated Ψ ({gap})"] = c["granulated"]
            row[f"Ψ interval ({gap})"] = _interval(c["granulated_interval"])
        for axis, a in by_gap.get("error", {}).get("per_axis", {}).items():
            row[f"ψ {axis} (error)"] = a["tau"]
        row["models"] = max((c["n"] for c in by_gap.values()), default=0)
        rows.append(row)
    return rows


def _scatter(result: dict, measure: str) -> str:
    axes = result["axes"] or ["model"]
    fig, panels = new_figure(3.3 * len(axes), 3.0, ncols=len(axes))
    panels = panels if isinstance(panels, list) else [panels]
    rows = [r for r in result["models"] if measure in r["measures"] and "error" in r["gaps"]]
    for axis, ax in zip(axes, panels):
        values = sorted({json.dumps(r["settings"].get(axis), default=str) for r in rows})
        for i, value in enumerate(values):
            chosen = [r for r in rows
                      if json.dumps(r["settings"].get(axis), default=str) == value]
            ax.scatter([r["measures"][measure] for r in chosen], [r["gaps"]["error"] for r in chosen],
                       s=16, color=f"C{i % 10}", label=value)
        xs = [r["measures"][measure] for r in rows]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 100:
            ax.set_xscale("log")
        ax.set_xlabel(measure)
        ax.set_ylabel("test − train error")
        ax.set_title(f"colour: {axis}", fontsize=9)
        ax.legend(fontsize=7)
    c = result["correlations"][measure].get("error", {})
    return figure_html(fig, caption=f"{measure} vs the error gap over {len(rows)} models: "
                                    f"τ = {fmt(c.get('tau'), 3)}, granulated Ψ = "
                                    f"{fmt(c.get('granulated'), 3)}.")


def _report(record: dict) -> str:
    result = record["result"]
    n = len(result["models"])
    axes = ", ".join(result["axes"]) or "none"
    parts = [f"<p>{n} models; hyperparameter axes: {html.escape(axes)}. Kendall τ_b of each "
             f"measure with the generalization gap, and the granulated Ψ (Jiang et al. 2020: "
             f"mean over axes of τ among models that differ only on that axis); "
             f"{int(result['confidence'] * 100)} % percentile bootstrap intervals over "
             f"{result['bootstrap']} resamples (models for τ, groups for Ψ).</p>",
             table_html(_tau_rows(result))]
    for measure in result["correlations"]:
        try:
            parts.append(_scatter(result, measure))
        except Exception as exc:  # noqa: BLE001 - one figure must not hide the table
            parts.append(f'<p class="error">{html.escape(measure)}: {html.escape(repr(exc))}</p>')
    return "".join(parts)


def _summary(record: dict) -> dict:
    row: dict = {"models": len(record["result"]["models"])}
    for measure, by_gap in record["result"]["correlations"].items():
        if "error" in by_gap:
            row[f"τ {measure}"] = by_gap["error"]["tau"]
            row[f"Ψ {measure}"] = by_gap["error"]["granulated"]
    return row


@register_measurement(KIND, options=CorrelationOptions, report=_report, summary=_summary,
                      description="Kendall τ and granulated τ of each measure with the "
                                  "generalization gap.")
def run_correlation(ctx, options: CorrelationOptions) -> dict:
    """Measure each trained model's generalization gap, then correlate the measures found in
    the study's records with it."""
    from ridgeline.sweep.task import generalization

    records = list(ctx.store.records())
    for name in options.models or ctx.model_names:
        gap = generalization(ctx.model(name), ctx.dataset("train"), ctx.dataset("test"),
                             ctx.config.training_for(name).loss)
        records.append({"id": f"model:{name}", "kind": "sweep_model", "status": "ok",
                        "result": {"model": name, "base_model": name, "settings": {}, **gap}})
    return correlation_result(records, resamples=options.bootstrap,
                              confidence=options.confidence, seed=ctx.seed)
