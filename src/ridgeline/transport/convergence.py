"""How sliced Wasserstein estimates settle as the number of projections grows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ridgeline.errors import ConfigError, ShapeMismatchError
from ridgeline.progress import progress_bar
from ridgeline.transport.control_variates import combine
from ridgeline.transport.inputs import check_p, prepare_pair
from ridgeline.transport.projections import check_count, generator_for, random_directions
from ridgeline.transport.sliced import per_direction_terms, root_stderr
from ridgeline.transport.wasserstein1d import safe_root

__all__ = ["SWConvergence", "sliced_wasserstein_convergence", "ESTIMATORS"]

#: estimator name -> control variate
ESTIMATORS = {"mc": None, "lower": "lower", "upper": "upper"}
_LABELS = {"mc": "Monte Carlo", "lower": "lower CV", "upper": "upper CV"}


@dataclass(frozen=True)
class SWConvergence:
    """SW_p estimates over repeated draws, for several numbers of projections L.

    Attributes
    ----------
    projections : list of int
        The numbers of directions L.
    estimators : list of str
        "mc", "lower", "upper".
    mean, std : dict estimator -> list of float (one per L)
        Mean and standard deviation of the SW_p estimate over ``repeats`` independent
        sets of directions (``std`` is the real spread of one estimate).
    stderr : dict estimator -> list of float
        The standard error each estimate reports, averaged over repeats (compare with
        ``std`` to see that the error bars are honest).
    repeats : int
    p : float
    name : str
    """

    projections: list[int]
    estimators: list[str]
    mean: dict[str, list[float]]
    std: dict[str, list[float]]
    stderr: dict[str, list[float]]
    repeats: int
    p: float
    name: str = ""

    def variance_reduction(self, estimator: str, L: int) -> float:
        """Var(MC) / Var(estimator) at L projections (> 1: the estimator is better)."""
        i = self.projections.index(L)
        mc, other = self.std["mc"][i], self.std[estimator][i]
        return mc ** 2 / other ** 2 if other > 0 else math.inf

    def rows(self) -> list[dict]:
        """One row per L: mean ± std for each estimator, and variance reductions."""
        out = []
        for i, L in enumerate(self.projections):
            row: dict[str, Any] = {"pair": self.name, "L": L}
            for est in self.estimators:
                row[_LABELS[est]] = f"{self.mean[est][i]:.4g} ± {self.std[est][i]:.2g}"
            for est in self.estimators:
                if est != "mc":
                    row[f"var ÷ ({_LABELS[est]})"] = self.variance_reduction(est, L)
            out.append(row)
        return out

    def to_dict(self) -> dict:
        from ridgeline._json import to_jsonable

        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> SWConvergence:
        def floats(table: dict) -> dict[str, list[float]]:
            return {k: [math.nan if v is None else float(v) for v in vs] for k, vs in table.items()}

        return cls(projections=[int(v) for v in data["projections"]],
                   estimators=list(data["estimators"]), mean=floats(data["mean"]),
                   std=floats(data["std"]), stderr=floats(data["stderr"]),
                   repeats=int(data["repeats"]), p=float(data["p"]), name=data.get("name", ""))

    def plot(self, ax=None):
        """Estimates (mean ± one standard deviation over repeats) against L, log scale."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(5, 3.4)
        count = len(self.estimators)
        for k, est in enumerate(self.estimators):
            shift = 1.0 + 0.06 * (k - (count - 1) / 2)  # side by side on the log axis
            ax.errorbar([L * shift for L in self.projections], self.mean[est], yerr=self.std[est],
                        marker="o", ms=3.5, capsize=3, lw=1.2, label=_LABELS[est])
        ax.set_xscale("log")
        ax.set_xlabel("projections L")
        ax.set_ylabel(f"SW$_{{{self.p:g}}}$ estimate")
        ax.set_title(self.name or "sliced Wasserstein")
        ax.legend()
        return ax


def sliced_wasserstein_convergence(
    x: Any, y: Any, *, projections: Sequence[int] = (10, 30, 100, 300, 1000), repeats: int = 20,
    p: float = 2, weights_x: Any = None, weights_y: Any = None,
    estimators: Sequence[str] = ("mc", "lower", "upper"),
    seed: int | torch.Generator | None = 0, name: str = "", progress: bool = False,
) -> SWConvergence:
    """SW_p estimates with error bars against the number of projections, per estimator.

    For each of ``repeats`` independent draws of max(L) directions, the per-direction
    W_p^p and control variates are computed once; the estimate at each L uses the first
    L directions, so all estimators see the same draws (a paired comparison). The spread
    over repeats is the real standard deviation of a single estimate.

    Parameters
    ----------
    x : Tensor (n, d)
    y : Tensor (m, d)
    projections : sequence of int
        The numbers of directions L to report.
    repeats : int ≥ 2
    p : float ≥ 1
        Control variates need p = 2; for other p only "mc" is allowed.
    weights_x, weights_y : optional probability weights of the points.
    estimators : subset of ("mc", "lower", "upper")
    seed : int, torch.Generator or None
    name : str
        Label of the pair, for tables and plots.
    progress : bool

    Returns
    -------
    SWConvergence
    """
    p = check_p(p)
    estimators = list(estimators)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown or not estimators or "mc" not in estimators:
        raise ConfigError(f"estimators must include 'mc' and be among {list(ESTIMATORS)}; got "
                          f"{estimators}.")
    if p != 2 and estimators != ["mc"]:
        raise ConfigError(f"control variates are defined for p=2 only; with p={p} use "
                          "estimators=('mc',).")
    grid = sorted({check_count(L, "projections") for L in projections})
    repeats = check_count(repeats, "repeats")
    if repeats < 2:
        raise ConfigError("repeats must be at least 2 to measure the spread of the estimates.")
    clouds = prepare_pair(x, y, weights_x, weights_y).detach()
    if clouds.x.dim() != 2 or clouds.y.dim() != 2:
        raise ShapeMismatchError("sliced_wasserstein_convergence takes one pair of clouds "
                                 f"(n, d) and (m, d); got {tuple(clouds.x.shape)} and "
                                 f"{tuple(clouds.y.shape)}.")
    kinds = tuple(ESTIMATORS[e] for e in estimators if ESTIMATORS[e] is not None)
    gen = generator_for(seed)
    estimates = {e: torch.empty(repeats, len(grid), dtype=torch.float64) for e in estimators}
    errors = {e: torch.empty(repeats, len(grid), dtype=torch.float64) for e in estimators}
    with torch.no_grad(), progress_bar(repeats, f"SW convergence {name}".strip(), progress) as bar:
        for r in range(repeats):
            directions = random_directions(clouds.dim, grid[-1], gen, dtype=clouds.x.dtype,
                                           device=clouds.x.device)
            values, controls = per_direction_terms(clouds, directions, p, kinds)
            for j, L in enumerate(grid):
                for est in estimators:
                    g, eg = controls.get(ESTIMATORS[est], (None, None))
                    power, power_se = combine(values[:L], None if g is None else g[:L], eg)
                    estimates[est][r, j] = float(safe_root(power, p))
                    errors[est][r, j] = float(root_stderr(power, power_se, p))
            bar.advance()
    return SWConvergence(
        projections=grid, estimators=estimators,
        mean={e: estimates[e].mean(0).tolist() for e in estimators},
        std={e: estimates[e].std(0).tolist() for e in estimators},
        stderr={e: errors[e].nanmean(0).tolist() for e in estimators},
        repeats=repeats, p=p, name=name)
