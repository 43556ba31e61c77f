"""Rank correlation of generalization measures with the generalization gap.

Kendall's τ_b over all models, the granulated τ of Jiang et al. (2020) (mean over
hyperparameter axes of τ among models that differ only on that axis), and percentile
bootstrap intervals for both.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["kendall_tau", "granulated_tau", "bootstrap_tau", "bootstrap_granulated",
           "correlate"]

_BLOCK = 512


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ_b with ties:

        τ_b = Σ_{i<j} sgn(x_i − x_j) sgn(y_i − y_j) / √((P − T_x)(P − T_y)),

    P = n(n−1)/2 pairs, T_x and T_y the pairs tied in x and in y (Kendall 1945). NaN when
    fewer than two values or either variable is constant. O(n²) time, O(512·n) memory.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length; got {x.shape} and {y.shape}.")
    n = x.size
    if n < 2:
        return math.nan
    s = tied_x = tied_y = 0
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        dx = np.sign(x[start:stop, None] - x[None, :])
        dy = np.sign(y[start:stop, None] - y[None, :])
        upper = np.arange(start, stop)[:, None] < np.arange(n)[None, :]  # pairs i < j
        s += int((dx * dy)[upper].sum())
        tied_x += int((dx[upper] == 0).sum())
        tied_y += int((dy[upper] == 0).sum())
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return s / denominator if denominator > 0 else math.nan


def _finite_mean(values: Sequence[float]) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return float(np.mean(kept)) if kept else math.nan


def _groups(settings: Sequence[Mapping[str, Any]], axis: str) -> list[list[int]]:
    """Indices of models sharing every setting but ``axis`` (groups of two or more)."""
    buckets: dict[str, list[int]] = defaultdict(list)
    for index, s in enumerate(settings):
        key = json.dumps({k: v for k, v in s.items() if k != axis}, sort_keys=True, default=str)
        buckets[key].append(index)
    return [g for g in buckets.values() if len(g) >= 2]


def _axis_taus(x: np.ndarray, y: np.ndarray, settings, axes) -> dict[str, list[float]]:
    out = {}
    for axis in axes:
        taus = [kendall_tau(x[g], y[g]) for g in _groups(settings, axis)]
        out[axis] = [t for t in taus if math.isfinite(t)]
    return out


def granulated_tau(x: Sequence[float], y: Sequence[float], settings: Sequence[Mapping[str, Any]],
                   axes: Sequence[str]) -> dict:
    """Granulated Kendall coefficient Ψ = (1/|A|) Σ_{a∈A} ψ_a (Jiang et al. 2020, eq. 4).

    ψ_a is the mean τ over the groups of models that share every setting except axis a
    (seed included in the shared settings). Returns ``{"tau": Ψ, "per_axis": {a: {"tau":
    ψ_a, "groups": count}}}``; axes with no group of two or more are left out of Ψ.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    per_axis = {axis: {"tau": _finite_mean(taus), "groups": len(taus)}
                for axis, taus in _axis_taus(x, y, settings, axes).items()}
    return {"tau": _finite_mean([v["tau"] for v in per_axis.values()]), "per_axis": per_axis}


def _interval(samples: Sequence[float], confidence: float) -> list[float] | None:
    kept = np.asarray([s for s in samples if math.isfinite(s)])
    if kept.size < 2:
        return None
    alpha = (1 - confidence) / 2
    return [float(np.quantile(kept, alpha)), float(np.quantile(kept, 1 - alpha))]


def bootstrap_tau(x, y, *, resamples: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of τ_b: models resampled with replacement."""
    if resamples < 2:
        return None
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, x.size, size=(resamples, x.size))
    return _interval([kendall_tau(x[d], y[d]) for d in draws], confidence)


def bootstrap_granulated(x, y, settings, axes, *, resamples: int = 1000,
                         confidence: float = 0.95, seed: int = 0) -> dict:
    """Bootstrap intervals of Ψ and of each ψ_a: within each axis the groups (models that
    differ only on that axis) are resampled with replacement, one draw per axis per
    replicate."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    taus = _axis_taus(x, y, settings, axes)
    if resamples < 2:
        return {"interval": None, "per_axis": {a: None for a in taus}}
    rng = np.random.default_rng(seed)
    per_axis: dict[str, list[float]] = {a: [] for a in taus}
    overall = []
    for _ in range(resamples):
        means = []
        for axis, values in taus.items():
            value = (float(np.mean(rng.choice(values, size=len(values)))) if values
                     else math.nan)
            per_axis[axis].append(value)
            means.append(value)
        overall.append(_finite_mean(means))
    return {"interval": _interval(overall, confidence),
            "per_axis": {a: _interval(v, confidence) for a, v in per_axis.items()}}


def correlate(models: Sequence[Mapping[str, Any]], axes: Sequence[str], *,
              resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """τ and granulated τ of every measure with every gap, with bootstrap intervals.

    Parameters
    ----------
    models : list of dict
        One per model: ``settings`` (axis → value, plus ``seed``), ``gaps`` (name → value)
        and ``measures`` (name → value).
    axes : list of str
        The hyperparameter axes that vary (granulated τ is over these).

    Returns
    -------
    dict
        ``{measure: {gap: {"n", "tau", "interval", "granulated", "granulated_interval",
        "per_axis": {axis: {"tau", "groups", "interval"}}}}}``.
    """
    measures = sorted({m for entry in models for m in entry["measures"]})
    gaps = sorted({g for entry in models for g in entry["gaps"]})
    out: dict = {}
    for measure in measures:
        out[measure] = {}
        for gap in gaps:
            rows = [e for e in models if _ok(e["measures"].get(measure)) and _ok(e["gaps"].get(gap))]
            x = np.array([e["measures"][measure] for e in rows], dtype=np.float64)
            y = np.array([e["gaps"][gap] for e in rows], dtype=np.float64)
            settings = [e["settings"] for e in rows]
            gran = granulated_tau(x, y, settings, axes)
            boot = bootstrap_granulated(x, y, settings, axes, resamples=resamples,
                                        confidence=confidence, seed=seed)
            out[measure][gap] = {
                "n": len(rows), "tau": kendall_tau(x, y) if len(rows) >= 2 else math.nan,
                "interval": bootstrap_tau(x, y, resamples=resamples, confidence=confidence,
                                          seed=seed) if len(rows) >= 2 else None,
                "granulated": gran["tau"], "granulated_interval": boot["interval"],
                "per_axis": {a: {**v, "interval": boot["per_axis"].get(a)}
                             for a, v in gran["per_axis"].items()},
            }
    return out


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
