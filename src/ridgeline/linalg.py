"""Matrix-free linear algebra on symmetric operators given as products with flat vectors.

Nothing here knows about neural networks. An *operator* is either a callable
``matvec(v) -> A v`` on 1-D tensors of length ``dim``, or an object with a ``matvec``
method (and optionally ``matmat(V)`` on ``(dim, b)`` column blocks, ``shape``, ``dtype``
and ``device``), such as :class:`ridgeline.curvature.CurvatureOperator`.

* :func:`lanczos` — extreme eigenpairs by Lanczos with full reorthogonalisation, stopped
  on the residual ‖A y − θ y‖ ≤ tol·|θ|;
* :func:`power_iteration` — the deflated power method (a baseline only);
* :func:`hutchinson`, :func:`hutchpp` — stochastic trace estimates with standard errors,
  stopped on a requested relative standard error;
* :func:`slq_density` — spectral density by stochastic Lanczos quadrature.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ridgeline.errors import ConfigError, ConvergenceWarning, ShapeMismatchError
from ridgeline.params import make_generator
from ridgeline.progress import progress_bar

__all__ = ["EigenResult", "TraceEstimate", "SpectralDensity", "lanczos", "power_iteration",
           "hutchinson", "hutchpp", "slq_density"]

Seed = int | torch.Generator | None


# ----------------------------------------------------------------------------- operators
class _Operator:
    """A uniform view of a callable or an operator object: flat-vector and block products,
    with conversion between the caller's working dtype and the operator's own."""

    def __init__(self, operator: Any, dim: int | None, dtype: torch.dtype | None,
                 device: torch.device | str | None) -> None:
        if callable(getattr(operator, "matvec", None)):
            self._matvec = operator.matvec
            self._matmat = getattr(operator, "matmat", None)
        elif callable(operator):
            self._matvec, self._matmat = operator, None
        else:
            raise ConfigError(f"the operator must be a callable matvec(v) or an object with a "
                              f"matvec method; got {type(operator).__name__}.")
        shape = getattr(operator, "shape", None)
        if dim is None:
            if shape is None:
                raise ConfigError("dim is required when the operator is a plain callable.")
            dim = int(shape[0])
        if shape is not None and int(shape[0]) != dim:
            raise ShapeMismatchError(f"dim={dim} but the operator has shape {tuple(shape)}.")
        if dim < 1:
            raise ConfigError(f"dim must be positive, got {dim}.")
        self.dim = int(dim)
        self.op_dtype = getattr(operator, "dtype", None)
        self.dtype = dtype or self.op_dtype or torch.get_default_dtype()
        self.device = torch.device(device or getattr(operator, "device", None) or "cpu")
        self.matvecs = 0

    def _to_op(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.op_dtype) if self.op_dtype is not None and t.dtype != self.op_dtype else t

    def _check(self, out: Any, expected: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeMismatchError(f"the operator returned {got} for an input of shape "
                                     f"{expected}; it must map vectors of length {self.dim} "
                                     "to vectors of the same length.")
        return out.to(device=self.device, dtype=self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.matvecs += 1
        return self._check(self._matvec(self._to_op(v)), (self.dim,))

    def block(self, rows: torch.Tensor) -> torch.Tensor:
        """A applied to each row of ``rows`` (b, dim) → (b, dim)."""
        b = rows.shape[0]
        self.matvecs += b
        if self._matmat is not None and b > 1:
            out = self._matmat(self._to_op(rows).T.contiguous())
            return self._check(out, (self.dim, b)).T
        return torch.stack([self._check(self._matvec(self._to_op(r)), (self.dim,)) for r in rows])


def _gaussian(gen: torch.Generator, shape: tuple[int, ...], op: _Operator) -> torch.Tensor:
    # drawn on the CPU so a seed gives the same vectors on every device
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(op.device, op.dtype)


def _rademacher(gen: torch.Generator, shape: tuple[int, ...], op: _Operator) -> torch.Tensor:
    signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(op.device)
    return signs.to(op.dtype) * 2 - 1


def _cpu_generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator) and seed.device.type != "cpu":
        raise ConfigError("pass a CPU torch.Generator (or an int seed); random vectors are drawn "
                          "on the CPU so that a seed gives the same numbers on every device.")
    return make_generator(seed)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the orthonormal rows of ``basis``, twice ("twice is enough",
    Giraud et al. 2005) so orthogonality holds to working precision."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    return value


def _new_axes(ax):
    from ridgeline.plotting import new_axes

    return new_axes(ax, 5, 3.5)


# ----------------------------------------------------------------------------- eigenvalues
@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    Attributes
    ----------
    values : Tensor (k,)
        Eigenvalue estimates, most extreme first (descending for ``which="largest"``,
        ascending for ``"smallest"``).
    vectors : Tensor (k, dim)
        Orthonormal eigenvector estimates, one per row.
    residuals : Tensor (k,)
        ‖A y − θ y‖ for each pair.
    matvecs : int
        Operator products used.
    iterations : int
    converged : bool
        Every residual ≤ tol·|θ|.
    which, tol, method
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    iterations: int
    converged: bool
    which: str = "largest"
    tol: float = 1e-3
    method: str = "lanczos"

    def to_dict(self) -> dict:
        return {"values": _json(self.values), "residuals": _json(self.residuals),
                "matvecs": self.matvecs, "iterations": self.iterations,
                "converged": self.converged, "which": self.which, "tol": self.tol,
                "method": self.method}

    def plot(self, ax=None):
        """The eigenvalues by index, with residuals as error bars; returns the Axes."""
        ax = _new_axes(ax)
        idx = np.arange(1, len(self.values) + 1)
        ax.errorbar(idx, self.values.cpu().numpy(), yerr=self.residuals.cpu().numpy(), fmt="o")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        return ax


def _check_k(k: int, dim: int, which: str) -> None:
    if which not in ("largest", "smallest"):
        raise ConfigError(f"which must be 'largest' or 'smallest', got {which!r}.")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}.")
    if k > dim:
        raise ConfigError(f"asked for k={k} eigenvalues but the operator has only {dim} "
                          f"dimensions (parameters); use k ≤ {dim}.")


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted Ritz values, most extreme first (theta is ascending)."""
    n = len(theta)
    return np.arange(n - 1, n - 1 - k, -1) if which == "largest" else np.arange(k)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor] | Any, dim: int | None = None, *,
            k: int = 1, which: str = "largest", tol: float = 1e-3, max_iter: int | None = None,
            seed: Seed = 0, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None, v0: torch.Tensor | None = None,
            progress: bool | None = False) -> EigenResult:
    """The k largest (or smallest) eigenpairs of a symmetric operator A by Lanczos.

    Builds an orthonormal Krylov basis Q_m of span{v0, A v0, …, A^{m−1} v0} with the
    three-term recurrence A q_j = β_{j−1} q_{j−1} + α_j q_j + β_j q_{j+1}, reorthogonalising
    every new vector against all previous ones (twice), so that Qᵀ A Q = T_m is the
    tridiagonal matrix of the α, β. The Ritz pairs (θ_i, y_i = Q_m s_i) of T_m s_i = θ_i s_i
    have residual ‖A y_i − θ_i y_i‖ = β_m |s_{m,i}| (exact while the basis stays
    orthogonal), so the iteration stops as soon as the k wanted Ritz pairs satisfy

        ‖A y_i − θ_i y_i‖ ≤ tol · |θ_i|,

    never on the relative change of θ. (For θ within rounding of zero, |θ_i| is replaced
    by 50·ε·max|θ|.) If the Krylov space becomes invariant before k pairs converge, the
    iteration continues from a fresh random vector orthogonal to it.

    Parameters
    ----------
    matvec : callable v ↦ A v on 1-D tensors, or an operator object with ``matvec``
    dim : int, optional
        Length of the vectors; read from ``matvec.shape`` when omitted.
    k : int
        Number of eigenpairs, 1 ≤ k ≤ dim.
    which : {"largest", "smallest"}
        Algebraically largest or smallest eigenvalues.
    tol : float
        Relative residual tolerance.
    max_iter : int, optional
        Maximum Krylov dimension (= operator products); default ``min(dim, max(100, 20k))``.
        Memory: (max_iter + 1) vectors of length dim.
    seed : int, torch.Generator or None
        Start vector v0 ~ N(0, I).
    dtype, device
        Working precision and device of the basis (default: the operator's).
    v0 : Tensor, optional
        Start vector (e.g. a previous eigenvector, to warm-start).
    progress : bool

    Returns
    -------
    EigenResult
        ``converged=False`` (with a :class:`~ridgeline.errors.ConvergenceWarning`) when
        ``max_iter`` products were not enough; the best Ritz pairs are returned anyway.

    References
    ----------
    Lanczos (1950); Parlett (1998), *The Symmetric Eigenvalue Problem*, ch. 13;
    Golub & Van Loan (2013), §10.1.
    """
    op = _Operator(matvec, dim, dtype, device)
    dim = op.dim
    _check_k(k, dim, which)
    if tol <= 0:
        raise ConfigError(f"tol must be positive, got {tol}.")
    max_iter = min(dim, max(100, 20 * k)) if max_iter is None else int(max_iter)
    if max_iter < k:
        raise ConfigError(f"max_iter={max_iter} is smaller than k={k}; Lanczos needs at least k "
                          "iterations.")
    max_iter = min(max_iter, dim)
    gen = _cpu_generator(seed)
    eps = torch.finfo(op.dtype).eps

    start = _gaussian(gen, (dim,), op) if v0 is None else v0.reshape(-1).to(op.device, op.dtype)
    if start.numel() != dim:
        raise ShapeMismatchError(f"v0 has {start.numel()} entries but the operator has dim={dim}.")
    if not bool(torch.isfinite(start).all()) or float(start.norm()) == 0.0:
        raise ConfigError("v0 must be a finite, non-zero vector.")
    basis = torch.empty(min(max_iter + 1, 64), dim, dtype=op.dtype, device=op.device)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    theta = s = resid = wanted = None
    with progress_bar(max_iter, f"lanczos (k={k}, {which})", progress) as bar:
        for j in range(max_iter):
            q = basis[j]
            w = op.matvec(q)
            alpha = float(torch.dot(q, w))
            w = w - alpha * q
            if j > 0:
                w = w - betas[-1] * basis[j - 1]
            w = _orthogonalise(w, basis[:j + 1])
            beta = float(w.norm())
            alphas.append(alpha)
            theta, s = eigh_tridiagonal(np.array(alphas), np.array(betas))
            resid = beta * np.abs(s[-1, :])
            scale = max(float(np.abs(theta).max()), 1e-300)
            if len(theta) >= k:
                wanted = _select(theta, k, which)
                bound = tol * np.maximum(np.abs(theta[wanted]), 50 * eps * scale)
                worst = float(np.max(resid[wanted] / np.maximum(bound, 1e-300) * tol))
                bar.advance(info=f"rel. residual {worst:.1e}")
                if bool(np.all(resid[wanted] <= bound)) or j + 1 == dim:
                    converged = True
                    break
            else:
                bar.advance()
            if j + 1 == max_iter:
                break
            if j + 1 >= basis.shape[0]:
                grown = torch.empty(min(2 * basis.shape[0], max_iter + 1), dim, dtype=op.dtype,
                                    device=op.device)
                grown[:basis.shape[0]] = basis
                basis = grown
            if beta <= 10 * eps * scale * math.sqrt(j + 1):
                # invariant subspace: continue with a random vector orthogonal to it
                w = _orthogonalise(_gaussian(gen, (dim,), op), basis[:j + 1])
                betas.append(0.0)
                basis[j + 1] = w / w.norm()
            else:
                betas.append(beta)
                basis[j + 1] = w / beta
    m = len(alphas)
    wanted = _select(theta, k, which)
    values = torch.as_tensor(theta[wanted], dtype=torch.float64)
    coeffs = torch.as_tensor(s[:, wanted], dtype=op.dtype, device=op.device)
    vectors = coeffs.T @ basis[:m]
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    residuals = torch.as_tensor(resid[wanted], dtype=torch.float64)
    if not converged:
        ratio = residuals / values.abs().clamp_min(1e-300)
        warnings.warn(
            f"Lanczos did not converge in {m} iterations: relative residuals "
            f"{', '.join(f'{r:.1e}' for r in ratio.tolist())} for k={k} ({which}) exceed "
            f"tol={tol}. Raise max_iter or loosen tol; the current estimates are returned.",
            ConvergenceWarning, stacklevel=2)
    return EigenResult(values=values, vectors=vectors, residuals=residuals, matvecs=op.matvecs,
                       iterations=m, converged=converged, which=which, tol=tol)


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor] | Any,
                    dim: int | None = None, *, k: int = 1, tol: float = 1e-3,
                    max_iter: int = 100, seed: Seed = 0, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> EigenResult:
    """Deflated power iteration, as in PyHessian (Yao et al. 2020). A baseline only.

    For each of k eigenpairs in turn: v ← A v/‖A v‖, orthogonalised against the pairs
    already found, until the Rayleigh quotient θ = vᵀ A v changes by less than
    tol·|θ| between two iterations. That stopping rule says nothing about the error
    (it stops early when the top eigenvalues are close); prefer :func:`lanczos`. Whether
    or not the test passed within ``max_iter``, each reported vector is the last unit
    iterate v (orthogonal to the earlier ones, so deflation uses an orthonormal basis),
    θ = vᵀAv its Rayleigh quotient and ‖A v − θ v‖ its true residual.

    Returns
    -------
    EigenResult
        ``which`` is "largest" in magnitude; ``converged`` means the relative-change test
        passed for every pair, not that the residuals are small.
    """
    op = _Operator(matvec, dim, dtype, device)
    _check_k(k, op.dim, "largest")
    gen = _cpu_generator(seed)
    found: list[torch.Tensor] = []
    values, residuals, iterations, all_converged = [], [], 0, True
    for _ in range(k):
        w = _gaussian(gen, (op.dim,), op)
        previous, ok, v, av, theta = None, False, w, None, 0.0
        for _ in range(max_iter):
            iterations += 1
            basis = torch.stack(found) if found else w.new_zeros(0, op.dim)
            v = _orthogonalise(w, basis)
            v = v / v.norm()                 # the unit iterate that is reported
            av = op.matvec(v)
            theta = float(torch.dot(v, av))
            if previous is not None and abs(theta - previous) <= tol * (abs(previous) + 1e-6):
                ok = True
                break
            previous = theta
            w = av                           # normalised (and deflated) next time round
        residuals.append(float((av - theta * v).norm()))
        values.append(theta)
        found.append(v)
        all_converged &= ok
    return EigenResult(values=torch.tensor(values, dtype=torch.float64), vectors=torch.stack(found),
                       residuals=torch.tensor(residuals, dtype=torch.float64),
                       matvecs=op.matvecs, iterations=iterations, converged=all_converged,
                       which="largest", tol=tol, method="power")


# ----------------------------------------------------------------------------- trace
@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of tr(A).

    Attributes
    ----------
    value : float
        The estimate.
    stderr : float
        Its standard error (0 when the trace was computed exactly).
    matvecs : int
        Operator products used.
    samples : int
        Random probes in the Monte Carlo part.
    converged : bool
        stderr ≤ rtol·|value| was reached within the budget.
    method : {"hutchinson", "hutch++"}
    rtol : float
    estimates : tuple of float
        The running estimate after each probe (for convergence plots).
    notes : tuple of str
    """

    value: float
    stderr: float
    matvecs: int
    samples: int
    converged: bool
    method: str
    rtol: float
    estimates: tuple[float, ...] = field(default=(), repr=False)
    notes: tuple[str, ...] = ()

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.value) if self.value else math.inf

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr,
                "relative_stderr": self.relative_stderr if self.value else None,
                "matvecs": self.matvecs, "samples": self.samples, "converged": self.converged,
                "method": self.method, "rtol": self.rtol, "notes": list(self.notes)}

    def plot(self, ax=None):
        """The running estimate against the probe count; returns the Axes."""
        ax = _new_axes(ax)
        if self.estimates:
            ax.plot(np.arange(1, len(self.estimates) + 1), self.estimates, label="running estimate")
        ax.axhline(self.value, color="k", lw=0.8)
        ax.axhspan(self.value - self.stderr, self.value + self.stderr, alpha=0.2,
                   label="± standard error")
        ax.set_xlabel("probes")
        ax.set_ylabel(f"trace ({self.method})")
        ax.legend()
        return ax


def _check_budget(rtol: float, max_matvecs: int) -> None:
    if rtol <= 0:
        raise ConfigError(f"rtol must be positive, got {rtol}.")
    if max_matvecs < 2:
        raise ConfigError(f"max_matvecs must be at least 2, got {max_matvecs}.")


def _monte_carlo(op: _Operator, probe: Callable[[int], torch.Tensor], offset: float, *,
                 rtol: float, budget: int, min_samples: int, block_size: int,
                 progress: bool | None, label: str) -> tuple[list[float], bool]:
    """Draw probes g (rows), add gᵀ A g, until stderr(offset + mean) ≤ rtol·|offset + mean|."""
    samples: list[float] = []
    with progress_bar(budget, label, progress) as bar:
        while len(samples) < budget:
            b = min(block_size, budget - len(samples))
            g = probe(b)
            samples += (g * op.block(g)).sum(dim=1).tolist()
            n = len(samples)
            bar.advance(b)
            if n >= max(min_samples, 2):
                value = offset + float(np.mean(samples))
                stderr = float(np.std(samples, ddof=1)) / math.sqrt(n)
                if stderr <= rtol * abs(value):
                    return samples, True
    return samples, False


def _trace_result(samples: list[float], offset: float, op: _Operator, ok: bool, method: str,
                  rtol: float) -> TraceEstimate:
    n = len(samples)
    value = offset + (float(np.mean(samples)) if n else 0.0)
    stderr = float(np.std(samples, ddof=1)) / math.sqrt(n) if n > 1 else (0.0 if ok else math.inf)
    running = tuple((offset + np.cumsum(samples) / np.arange(1, n + 1)).tolist()) if n else ()
    if not ok:
        warnings.warn(f"{method} reached max_matvecs={op.matvecs} with relative standard error "
                      f"{stderr / max(abs(value), 1e-300):.3g} > rtol={rtol}; raise max_matvecs "
                      "or loosen rtol.", ConvergenceWarning, stacklevel=3)
    return TraceEstimate(value=value, stderr=stderr, matvecs=op.matvecs, samples=n,
                         converged=ok, method=method, rtol=rtol, estimates=running)


def hutchinson(matvec: Callable[[torch.Tensor], torch.Tensor] | Any, dim: int | None = None, *,
               rtol: float = 0.05, max_matvecs: int = 1000, min_samples: int = 10,
               block_size: int = 1, seed: Seed = 0, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None,
               progress: bool | None = False) -> TraceEstimate:
    """Hutchinson's estimate of tr(A) with Rademacher probes, stopped on its standard error.

    tr(A) ≈ (1/n) Σ_i g_iᵀ A g_i with g_i ∈ {±1}^dim, whose variance per probe is
    2(‖A‖_F² − Σ_j A_jj²). Probes are drawn until the standard error of the mean
    (sample standard deviation / √n, after at least ``min_samples`` probes) is at most
    ``rtol`` times the estimate, or ``max_matvecs`` products have been spent.

    Parameters
    ----------
    block_size : int
        Probes per operator call (uses ``matmat`` when the operator has one).

    References
    ----------
    Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines"; Avron & Toledo (2011).
    """
    op = _Operator(matvec, dim, dtype, device)
    _check_budget(rtol, max_matvecs)
    gen = _cpu_generator(seed)
    samples, ok = _monte_carlo(op, lambda b: _rademacher(gen, (b, op.dim), op), 0.0, rtol=rtol,
                               budget=max_matvecs, min_samples=min_samples,
                               block_size=max(1, block_size), progress=progress,
                               label="hutchinson")
    return _trace_result(samples, 0.0, op, ok, "hutchinson", rtol)


def hutchpp(matvec: Callable[[torch.Tensor], torch.Tensor] | Any, dim: int | None = None, *,
            rtol: float = 0.05, max_matvecs: int = 1000, rank: int | None = None,
            min_samples: int = 10, block_size: int = 1, seed: Seed = 0,
            dtype: torch.dtype | None = None, device: torch.device | str | None = None,
            progress: bool | None = False) -> TraceEstimate:
    """Hutch++: exact trace on a sketched dominant subspace plus Hutchinson on the rest.

    With S ∈ {±1}^{dim×r}, Q = orth(A S) (r products) captures the dominant eigenspace,
    and

        tr(A) = tr(Qᵀ A Q) + tr((I − QQᵀ) A (I − QQᵀ)),

    where the first term is exact (r more products) and the second is estimated by
    Hutchinson with projected probes (I − QQᵀ) g. Removing the large eigenvalues from
    the Monte Carlo part cuts its variance, which is what makes Hutch++ need
    O(1/ε) instead of O(1/ε²) products. The projected probes are drawn until the standard
    error is ≤ rtol·|estimate| (at least ``min_samples``), as in :func:`hutchinson`.

    Parameters
    ----------
    rank : int, optional
        Sketch size r; default ``min(dim, 20, max_matvecs // 3)``. With r ≥ dim the trace
        is computed exactly (standard error 0).

    References
    ----------
    Meyer, Musco, Musco & Woodruff (2021), "Hutch++: Optimal stochastic trace
    estimation", SOSA.
    """
    op = _Operator(matvec, dim, dtype, device)
    _check_budget(rtol, max_matvecs)
    gen = _cpu_generator(seed)
    rank = min(op.dim, 20, max(1, max_matvecs // 3)) if rank is None else int(rank)
    if rank < 1:
        raise ConfigError(f"rank must be positive, got {rank}.")
    if 2 * min(rank, op.dim) > max_matvecs:
        raise ConfigError(f"the sketch of rank {rank} needs {2 * min(rank, op.dim)} products but "
                          f"max_matvecs={max_matvecs}; lower rank or raise max_matvecs.")
    if rank >= op.dim:
        eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
        exact = float(torch.diagonal(op.block(eye)).sum())
        return TraceEstimate(value=exact, stderr=0.0, matvecs=op.matvecs, samples=0,
                             converged=True, method="hutch++", rtol=rtol)
    sketch = op.block(_rademacher(gen, (rank, op.dim), op))           # rows: A s_i
    q = torch.linalg.qr(sketch.T.to(torch.float64))[0].T.to(op.dtype)  # (rank, dim), orthonormal
    low_rank = float((q * op.block(q)).sum())                          # tr(Qᵀ A Q)

    def probe(b: int) -> torch.Tensor:
        g = _rademacher(gen, (b, op.dim), op)
        return g - (g @ q.T) @ q

    samples, ok = _monte_carlo(op, probe, low_rank, rtol=rtol, budget=max_matvecs - op.matvecs,
                               min_samples=min_samples, block_size=max(1, block_size),
                               progress=progress, label="hutch++")
    return _trace_result(samples, low_rank, op, ok, "hutch++", rtol)


# ----------------------------------------------------------------------------- density
@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed eigenvalue density from stochastic Lanczos quadrature.

    Attributes
    ----------
    grid : Tensor (points,)
    density : Tensor (points,)
        φ(t) = (1/R) Σ_r Σ_j w_rj 𝒩(t; θ_rj, σ²); integrates to 1.
    nodes, weights : Tensor (runs, steps)
        Gauss quadrature nodes θ_rj and weights w_rj of each run (padded with weight 0
        where a run ended early).
    sigma : float
        Gaussian broadening.
    dim : int
    matvecs : int
    notes : tuple of str
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    dim: int
    matvecs: int
    notes: tuple[str, ...] = ()

    def moment(self, p: int) -> float:
        """Estimate of tr(A^p)/dim = mean over runs of Σ_j w_rj θ_rj^p (exact in expectation,
        and exact per run for p ≤ 2·steps − 1)."""
        return float((self.weights * self.nodes.pow(p)).sum(dim=1).mean())

    @property
    def moments(self) -> dict[int, float]:
        """The first four normalised moments tr(A^p)/dim."""
        return {p: self.moment(p) for p in range(1, 5)}

    @property
    def trace(self) -> float:
        """dim · (first moment): a (Gaussian-probe) trace estimate."""
        return self.dim * self.moment(1)

    def to_dict(self) -> dict:
        return {"grid": _json(self.grid), "density": _json(self.density),
                "nodes": _json(self.nodes), "weights": _json(self.weights), "sigma": self.sigma,
                "dim": self.dim, "matvecs": self.matvecs,
                "moments": {str(p): v for p, v in self.moments.items()},
                "notes": list(self.notes)}

    def plot(self, ax=None, *, log: bool = True):
        """The density (log scale by default, as in Ghorbani et al.); returns the Axes."""
        ax = _new_axes(ax)
        density = self.density.cpu().numpy()
        if log:
            floor = max(float(density.max()) * 1e-8, 1e-300)
            ax.semilogy(self.grid.cpu().numpy(), np.maximum(density, floor))
        else:
            ax.plot(self.grid.cpu().numpy(), density)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def _lanczos_runs(op: _Operator, starts: torch.Tensor, steps: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent Lanczos processes (full reorthogonalisation within each) from the rows of
    ``starts``, advanced together so every step is one block product.

    Returns α (b, steps), β (b, steps − 1) and the number of steps each run completed
    (a run stops early when its Krylov space becomes invariant)."""
    b, dim = starts.shape
    eps = torch.finfo(op.dtype).eps
    basis = torch.zeros(b, steps, dim, dtype=op.dtype, device=op.device)   # run-major
    basis[:, 0] = starts / starts.norm(dim=1, keepdim=True)
    alphas = np.zeros((b, steps))
    betas = np.zeros((b, max(steps - 1, 0)))
    length = np.full(b, steps)
    rows = np.arange(b)                                   # the runs still going
    for j in range(steps):
        everyone = len(rows) == b
        runs = basis if everyone else basis[torch.as_tensor(rows, device=op.device)]
        q = runs[:, j]
        w = op.block(q)
        alpha = (q * w).sum(dim=1)
        w = w - alpha[:, None] * q
        if j > 0:
            w = w - torch.as_tensor(betas[rows, j - 1], dtype=op.dtype,
                                    device=op.device)[:, None] * runs[:, j - 1]
        # each run against its own basis (matrix-vector products; bmm with one column is slow)
        w = torch.stack([_orthogonalise(w[r], runs[r, :j + 1]) for r in range(len(rows))])
        beta = w.norm(dim=1).double().cpu().numpy()
        alphas[rows, j] = alpha.double().cpu().numpy()
        if j + 1 == steps:
            break
        scale = np.abs(alphas[rows, :j + 1]).max(axis=1) + (
            np.abs(betas[rows, :j]).max(axis=1) if j > 0 else 0.0)
        done = beta <= 10 * eps * np.maximum(scale, 1e-300) * math.sqrt(j + 1)
        length[rows[done]] = j + 1
        betas[rows[~done], j] = beta[~done]
        keep = torch.as_tensor(~done, device=op.device)
        basis[torch.as_tensor(rows[~done], device=op.device), j + 1] = (
            w[keep] / torch.as_tensor(beta[~done], dtype=op.dtype, device=op.device)[:, None])
        rows = rows[~done]
        if len(rows) == 0:
            break
    return alphas, betas, length


def slq_density(matvec: Callable[[torch.Tensor], torch.Tensor] | Any, dim: int | None = None,
                *, runs: int = 10, steps: int = 80, seed: Seed = 0, points: int = 1000,
                sigma: float | None = None, block_size: int | None = None,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                progress: bool | None = False) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

    For each of R random unit vectors v_r (Gaussian, normalised), m = ``steps`` Lanczos
    steps with full reorthogonalisation give T_r = S_r diag(θ_r) S_rᵀ; the Gauss
    quadrature nodes θ_rj and weights w_rj = (S_r)_{1j}² satisfy
    Σ_j w_rj f(θ_rj) = v_rᵀ f(A) v_r exactly for polynomials f of degree ≤ 2m − 1, and
    E[v_rᵀ f(A) v_r] = tr f(A)/dim. The density of the eigenvalues λ_i of A,
    (1/dim) Σ_i δ(t − λ_i), is estimated by the Gaussian-broadened quadrature

        φ(t) = (1/R) Σ_r Σ_j w_rj 𝒩(t; θ_rj, σ²).

    Parameters
    ----------
    runs : int
        R, independent start vectors.
    steps : int
        m, Lanczos steps per run (capped at dim).
    points : int
        Grid size of the returned density.
    sigma : float, optional
        Broadening; default 0.5 % of the range of the nodes.
    block_size : int, optional
        Runs advanced together (one block product per step); default all of them.
        Memory: block_size · steps vectors of length dim.

    References
    ----------
    Golub & Meurant (2010), *Matrices, Moments and Quadrature*; Lin, Saad & Yang (2016),
    "Approximating spectral densities of large matrices"; Ghorbani, Krishnan & Xiao
    (2019), "An investigation into neural net optimization via Hessian eigenvalue
    density"; Papyan (2020).
    """
    op = _Operator(matvec, dim, dtype, device)
    if runs < 1 or steps < 1 or points < 2:
        raise ConfigError(f"runs and steps must be positive and points ≥ 2; got runs={runs}, "
                          f"steps={steps}, points={points}.")
    steps = min(steps, op.dim)
    block_size = runs if block_size is None else max(1, int(block_size))
    gen = _cpu_generator(seed)
    nodes = np.zeros((runs, steps))
    weights = np.zeros((runs, steps))
    with progress_bar(runs, "slq", progress) as bar:
        for first in range(0, runs, block_size):
            b = min(block_size, runs - first)
            alphas, betas, length = _lanczos_runs(op, _gaussian(gen, (b, op.dim), op), steps)
            for r in range(b):
                m = int(length[r])
                theta, s = eigh_tridiagonal(alphas[r, :m], betas[r, :m - 1])
                nodes[first + r, :m] = theta
                weights[first + r, :m] = s[0, :] ** 2
            bar.advance(b)
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    sigma = 0.005 * width if sigma is None else float(sigma)
    if sigma <= 0:
        raise ConfigError(f"sigma must be positive, got {sigma}.")
    pad = max(3 * sigma, 0.01 * width)
    grid = np.linspace(lo - pad, hi + pad, points)
    density = np.zeros(points)
    for r in range(runs):
        z = (grid[:, None] - nodes[r][None, :]) / sigma
        density += (np.exp(-0.5 * z ** 2) * weights[r][None, :]).sum(axis=1)
    density /= runs * sigma * math.sqrt(2 * math.pi)
    return SpectralDensity(grid=torch.from_numpy(grid), density=torch.from_numpy(density),
                           nodes=torch.from_numpy(nodes), weights=torch.from_numpy(weights),
                           sigma=sigma, dim=op.dim, matvecs=op.matvecs)
