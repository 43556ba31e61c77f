"""Infinite-width NNGP and NTK of fully-connected networks in NTK parameterisation.

For ``mlp(d, [n]*depth, O, parameterization="ntk", weight_std=σ_w, bias_std=σ_b)``, as
every width n → ∞ the output at initialisation is a Gaussian process with covariance
Σ^{(L+1)} (the NNGP) and the empirical NTK of every output converges to Θ^{(L+1)}
(Jacot et al. 2018), given by the recursion

    Σ¹(x, x') = σ_w² x·x'/d + σ_b²,                 Θ¹ = Σ¹,
    Σ^{l+1}  = σ_w² E[φ(u) φ(v)] + σ_b²,            (u, v) ~ N(0, Σ^l restricted to x, x')
    Θ^{l+1}  = Σ^{l+1} + σ_w² E[φ'(u) φ'(v)] Θ^l,

with closed-form expectations for ReLU (the arc-cosine kernels of Cho & Saul 2009) and
erf (Williams 1997).
"""

from __future__ import annotations

import math

import torch

from ridgeline.errors import ConfigError, DataError, ShapeMismatchError

__all__ = ["infinite_ntk", "infinite_nngp", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "erf")


def _expectations(activation: str, k11: torch.Tensor, k22: torch.Tensor, k12: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[φ(u)φ(v)], E[φ'(u)φ'(v)]) for (u, v) ~ N(0, [[k11, k12], [k12, k22]]).

    k11 (N1, 1), k22 (1, N2), k12 (N1, N2).
    """
    if activation == "relu":
        norms = torch.sqrt(k11 * k22)
        cos = torch.where(norms > 0, k12 / norms.clamp_min(torch.finfo(k12.dtype).tiny),
                          torch.zeros_like(k12)).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        value = norms / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cos)
        derivative = (math.pi - theta) / (2 * math.pi)
        return value, derivative
    a, b = 1 + 2 * k11, 1 + 2 * k22
    value = (2 / math.pi) * torch.arcsin((2 * k12 / torch.sqrt(a * b)).clamp(-1.0, 1.0))
    derivative = (4 / math.pi) / torch.sqrt((a * b - 4 * k12 ** 2).clamp_min(torch.finfo(k12.dtype).tiny))
    return value, derivative


def _recursion(x1: torch.Tensor, x2: torch.Tensor | None, depth: int, activation: str,
               weight_var: float, bias_var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(NNGP, NTK) of the output layer, computed in float64."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ConfigError(f"depth (the number of hidden layers) must be an integer ≥ 0, got {depth!r}.")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {list(ACTIVATIONS)} for a closed-form "
                          f"infinite-width kernel, got {activation!r}.")
    for name, value in (("weight_var", weight_var), ("bias_var", bias_var)):
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ConfigError(f"{name} must be a finite number ≥ 0, got {value!r}.")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 1:
            raise ShapeMismatchError(f"{name} must be a tensor (N, d) (or (N, ...), flattened as "
                                     f"the mlp does), got {getattr(x, 'shape', type(x).__name__)}.")
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{name} contains NaN or inf.")
    a = x1.reshape(x1.shape[0], -1).to(torch.float64)
    b = a if x2 is None else x2.reshape(x2.shape[0], -1).to(device=x1.device, dtype=torch.float64)
    if b.shape[1] != a.shape[1]:
        raise ShapeMismatchError(f"x1 has {a.shape[1]} features per example but x2 has "
                                 f"{b.shape[1]}; both must have the network's input size.")
    d = a.shape[1]
    w, s = float(weight_var), float(bias_var)
    k12 = w * (a @ b.T) / d + s
    k11 = (w * (a * a).sum(1) / d + s)[:, None]
    k22 = (w * (b * b).sum(1) / d + s)[None, :]
    ntk = k12
    for _ in range(depth):
        value, derivative = _expectations(activation, k11, k22, k12)
        diag1, _ = _expectations(activation, k11, k11, k11)
        diag2, _ = _expectations(activation, k22, k22, k22)
        k12 = w * value + s
        ntk = k12 + w * derivative * ntk
        k11, k22 = w * diag1 + s, w * diag2 + s
    return k12, ntk


def _output(kernel: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    dtype = x1.dtype if x1.is_floating_point() else torch.get_default_dtype()
    return kernel.to(dtype)


def infinite_ntk(x1: torch.Tensor, x2: torch.Tensor | None = None, *, depth: int,
                 activation: str = "relu", weight_var: float = 1.0, bias_var: float = 0.0
                 ) -> torch.Tensor:
    """The infinite-width NTK Θ^{(L+1)}(x, x') of a fully-connected network.

    Matches ``ridgeline.models.mlp(d, [n] * depth, O, parameterization="ntk",
    activation=activation, weight_std=√weight_var, bias_std=√bias_var)`` as n → ∞:
    each output's empirical NTK converges to this kernel and different outputs decouple,
    so compare with ``empirical_ntk(..., trace="mean")``. The recursion (module docstring)
    starts from Σ¹ = weight_var·x·x'/d + bias_var and adds, per hidden layer,
    Θ^{l+1} = Σ^{l+1} + weight_var·E[φ'(u)φ'(v)]·Θ^l.

    Parameters
    ----------
    x1 : Tensor (N1, d)
    x2 : Tensor (N2, d), optional (defaults to x1)
    depth : int
        Number of hidden layers L (0 gives the linear kernel Σ¹).
    activation : {"relu", "erf"}
    weight_var, bias_var : float
        σ_w² and σ_b², the squares of ``weight_std`` and ``bias_std`` of the mlp.

    Returns
    -------
    Tensor (N1, N2), in x1's dtype (computed in float64).

    References
    ----------
    Jacot, Gabriel & Hongler (2018), "Neural Tangent Kernel", Theorem 1; Cho & Saul (2009),
    "Kernel Methods for Deep Learning" (arc-cosine kernels); Williams (1997), "Computing
    with infinite networks" (erf); Lee et al. (2019), "Wide Neural Networks of Any Depth
    Evolve as Linear Models Under Gradient Descent", Appendix.
    """
    return _output(_recursion(x1, x2, depth, activation, weight_var, bias_var)[1], x1)


def infinite_nngp(x1: torch.Tensor, x2: torch.Tensor | None = None, *, depth: int,
                  activation: str = "relu", weight_var: float = 1.0, bias_var: float = 0.0
                  ) -> torch.Tensor:
    """The infinite-width NNGP kernel Σ^{(L+1)}(x, x') = E[f(x) f(x')] of each output at
    initialisation, for the same networks and arguments as :func:`infinite_ntk`.

    References
    ----------
    Neal (1996), "Bayesian Learning for Neural Networks"; Lee et al. (2018), "Deep Neural
    Networks as Gaussian Processes"; Cho & Saul (2009); Williams (1997).
    """
    return _output(_recursion(x1, x2, depth, activation, weight_var, bias_var)[0], x1)
