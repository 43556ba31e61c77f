"""Kernel dynamics: a network's outputs under gradient flow on the MSE loss, from its NTK.

With ridgeline's ``"mse"`` loss L = (1/N) Σ_i ½‖f(x_i) − y_i‖² and gradient flow
dθ/dt = −η ∇L, a network whose NTK Θ stays constant (the infinite-width / lazy regime)
has outputs

    f_t(X)  = Y + e^{−ηΘt/N} (f_0(X) − Y),
    f_t(x*) = f_0(x*) + Θ(x*, X) Θ⁻¹ (I − e^{−ηΘt/N}) (Y − f_0(X)),

(Jacot et al. 2018; Lee et al. 2019), evaluated through one eigendecomposition of Θ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ridgeline.errors import ConfigError, DataError, ShapeMismatchError

__all__ = ["predict_gd"]


def _as_matrix(k: torch.Tensor, name: str, rows: int | None = None) -> tuple[torch.Tensor, int | None]:
    """A kernel (N1, N2) or (N1, N2, O, O) as a matrix, and O for a full kernel."""
    if not isinstance(k, torch.Tensor) or k.dim() not in (2, 4):
        raise ShapeMismatchError(f"{name} must be a kernel of shape (N1, N2) or (N1, N2, O, O), "
                                 f"got {getattr(k, 'shape', type(k).__name__)}.")
    if k.dim() == 4:
        if k.shape[2] != k.shape[3]:
            raise ShapeMismatchError(f"{name} has output blocks of shape {tuple(k.shape[2:])}; "
                                     "they must be square (O, O).")
        n1, n2, o, _ = k.shape
        return k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o), int(o)
    return k, None


def _targets(y: torch.Tensor, n: int, outputs: int | None) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() not in (1, 2) or y.shape[0] != n:
        raise ShapeMismatchError(f"y_train must have one row per training example, shape ({n},) "
                                 f"or ({n}, O); got {getattr(y, 'shape', type(y).__name__)}.")
    if not y.is_floating_point():
        classes = outputs if outputs is not None else int(y.max()) + 1
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise DataError(f"integer labels must lie in [0, {classes}), got range "
                            f"[{int(y.min())}, {int(y.max())}].")
        return torch.nn.functional.one_hot(y, classes).to(torch.float64)
    return (y[:, None] if y.dim() == 1 else y).to(torch.float64)


def _initial(f0, shape: tuple[int, int], name: str, device) -> torch.Tensor:
    if not isinstance(f0, torch.Tensor):
        return torch.full(shape, float(f0), dtype=torch.float64, device=device)
    if f0.dim() == 0:
        return torch.full(shape, float(f0), dtype=torch.float64, device=device)
    f0 = f0.to(device=device, dtype=torch.float64)
    if f0.dim() == 1 and shape[1] == 1:
        f0 = f0[:, None]
    if tuple(f0.shape) != shape:
        raise ShapeMismatchError(f"{name} has shape {tuple(f0.shape)} but the outputs have shape "
                                 f"{shape} (examples, outputs).")
    return f0


def _times(t) -> tuple[torch.Tensor, bool]:
    scalar = not isinstance(t, (Sequence, torch.Tensor)) or (isinstance(t, torch.Tensor) and t.dim() == 0)
    values = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if values.numel() == 0 or bool(torch.isnan(values).any()) or bool((values < 0).any()):
        raise ConfigError(f"t must be a time ≥ 0 (or a sequence of them; inf allowed), got {t!r}.")
    return values, scalar


TRACES = ("sum", "mean")


def _per_output(k: torch.Tensor, o_full: int | None, trace: str | None, outputs: int,
                name: str) -> torch.Tensor:
    """The per-output kernel Θ of Θ ⊗ I_O from a traced kernel; a full kernel unchanged."""
    if o_full is not None:
        if trace is not None:
            raise ConfigError(f"{name} is a full (N1, N2, O, O) kernel, so there is no trace to "
                              f"undo; drop trace={trace!r} (or pass a traced (N1, N2) kernel).")
        return k
    if trace not in TRACES:
        raise ConfigError(
            f"{name} is a traced (N1, N2) kernel, so say how it was traced: trace='sum' "
            "(empirical_ntk's default, the sum of the O per-output kernels, which taken as "
            "the per-output kernel would make gradient flow run O times too fast) or "
            "trace='mean' (empirical_ntk(..., trace='mean'), infinite_ntk, or any per-output "
            f"kernel); got trace={trace!r}. Or pass the full kernel (empirical_ntk(..., "
            "trace=None)).")
    return k / outputs if trace == "sum" else k


def predict_gd(k_train: torch.Tensor, y_train: torch.Tensor, *, lr: float, t,
               trace: str | None = None, f0_train: torch.Tensor | float = 0,
               k_test_train: torch.Tensor | None = None, f0_test: torch.Tensor | float = 0):
    """Outputs of a network trained by gradient flow on MSE, predicted from its NTK.

    f_t(X)  = Y + e^{−ηΘt/N} (f_0(X) − Y)
    f_t(x*) = f_0(x*) + Θ(x*, X) Θ⁻¹ (I − e^{−ηΘt/N}) (Y − f_0(X))

    for ridgeline's ``"mse"`` loss (1/N) Σ ½‖f − y‖², learning rate η and time t in units
    of gradient steps (t steps of gradient descent with a small learning rate η). With
    Θ = V diag(λ) Vᵀ, e^{−ηΘt/N} = V diag(e^{−ηλt/N}) Vᵀ and Θ⁻¹(I − e^{−ηΘt/N}) uses
    (1 − e^{−ηλt/N})/λ, which tends to ηt/N for λ → 0, so a singular Θ is fine and
    t = inf gives kernel regression (interpolation on the range of Θ). Eigenvalues below
    √(N·O)·eps·λ_max (eps of the kernel's dtype) are rounding noise and are treated as 0.

    Parameters
    ----------
    k_train : Tensor (N, N) or (N, N, O, O)
        NTK on the training inputs. A traced kernel stands for the same kernel Θ on every
        output (Θ ⊗ I_O: the infinite-width structure); a full kernel couples the outputs.
    y_train : Tensor (N,), (N, O) or integer labels (N,) (one-hot encoded, as the mse loss does)
    lr : float
        η, the learning rate.
    t : float or sequence of float
        Training time(s) ≥ 0; ``float("inf")`` for convergence.
    trace : {"sum", "mean"}, required for a traced kernel
        How a traced (N, N) kernel was made: ``"sum"`` over the O outputs (the default of
        :func:`empirical_ntk`; divided by O here) or ``"mean"`` (already the per-output
        kernel, as :func:`infinite_ntk` gives). A traced kernel without ``trace`` is
        refused: taking a summed kernel for the per-output one runs the flow O× too fast.
        ``None`` (the default) for a full (N, N, O, O) kernel.
    f0_train : Tensor (N, O) or float
        Outputs at initialisation on the training inputs (0 for the centred/mean predictor).
    k_test_train : Tensor (M, N) or (M, N, O, O), optional
        NTK between test and training inputs, same kind as ``k_train``.
    f0_test : Tensor (M, O) or float

    Returns
    -------
    Tensor or (Tensor, Tensor)
        f_t on the training inputs, shape (N, O) — or (T, N, O) for a sequence of times —
        and, when ``k_test_train`` is given, also f_t on the test inputs, (M, O) or (T, M, O).
        Like neural-tangents' ``predict.gradient_descent_mse``. Dtype of ``k_train``.

    References
    ----------
    Jacot, Gabriel & Hongler (2018), §5; Lee et al. (2019), "Wide Neural Networks of Any
    Depth Evolve as Linear Models Under Gradient Descent", Eq. (9)–(10).
    """
    kmat, o_full = _as_matrix(k_train, "k_train")
    if kmat.shape[0] != kmat.shape[1]:
        raise ShapeMismatchError(f"k_train must be square (N, N), got {tuple(k_train.shape)}.")
    if not math.isfinite(float(lr)) or float(lr) <= 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}.")
    n = int(k_train.shape[0])
    y = _targets(y_train, n, o_full)
    if o_full is not None and y.shape[1] != o_full:
        raise ShapeMismatchError(f"k_train has {o_full} outputs per example but y_train has "
                                 f"{y.shape[1]}.")
    o = y.shape[1]
    kmat = _per_output(kmat, o_full, trace, o, "k_train")
    device = kmat.device
    y = y.to(device)
    times, scalar = _times(t)
    f0 = _initial(f0_train, (n, o), "f0_train", device)
    k64 = kmat.to(torch.float64)
    values, vectors = torch.linalg.eigh((k64 + k64.T) / 2)
    # eigenvalues below the rounding level of the kernel's dtype, √N·eps·λ_max, are zeros
    eps = torch.finfo(kmat.dtype if kmat.is_floating_point() else torch.float32).eps
    active = values > values.abs().max() * math.sqrt(kmat.shape[0]) * eps
    values = torch.where(active, values, torch.zeros_like(values))

    def columns(m: torch.Tensor) -> torch.Tensor:  # (N, O) -> matrix matching kmat
        return m.reshape(-1, 1) if o_full is not None else m

    residual = vectors.T @ columns(f0 - y)  # f_0 − Y in the eigenbasis
    steps = times[:, None].to(device)  # (T, 1)
    exponent = torch.where(active[None, :], float(lr) * values[None, :] / n * steps,
                           torch.zeros_like(steps))  # ηλt/N, (T, K)
    decay = torch.exp(-exponent)
    train = columns(y)[None] + vectors[None] @ (decay[:, :, None] * residual[None])
    dtype = k_train.dtype if k_train.is_floating_point() else torch.get_default_dtype()
    train = train.reshape(len(times), n, o).to(dtype)
    if k_test_train is None:
        return train[0] if scalar else train
    kx, o_test = _as_matrix(k_test_train, "k_test_train")
    if o_test != o_full or k_test_train.shape[1] != n:
        raise ShapeMismatchError(f"k_test_train has shape {tuple(k_test_train.shape)}; it must be "
                                 f"(M, {n}){'' if o_full is None else f', {o_full}, {o_full}'} "
                                 "like k_train.")
    kx = _per_output(kx, o_test, trace, o, "k_test_train")
    m = int(k_test_train.shape[0])
    g0 = _initial(f0_test, (m, o), "f0_test", device)
    # Θ⁻¹(I − e^{−ηΘt/N}) per eigenvalue: −expm1(−ηλt/N)/λ, which is ηt/N for λ = 0 (and
    # 0 at t = inf there: the pseudo-inverse, as Θ(x*, X) vanishes on Θ's null space)
    safe = torch.where(active, values, torch.ones_like(values))[None, :]
    null_gain = torch.where(torch.isinf(steps), torch.zeros_like(steps),
                            float(lr) * steps.nan_to_num(posinf=0.0) / n)
    gain = torch.where(active[None, :], -torch.expm1(-exponent) / safe, null_gain)
    test = columns(g0)[None] - (kx.to(torch.float64) @ vectors)[None] @ (gain[:, :, None] * residual[None])
    test = test.reshape(len(times), m, o).to(dtype)
    return (train[0], test[0]) if scalar else (train, test)
