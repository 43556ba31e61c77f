"""Kernel diagnostics: eigen-spectrum, kernel-target alignment, kernel drift."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ridgeline.errors import DataError, ShapeMismatchError

__all__ = ["KernelSpectrum", "spectrum", "alignment", "drift", "relative_error"]


def _square(k: torch.Tensor, name: str = "K") -> torch.Tensor:
    """A kernel (N, N) or (N, N, O, O) as an (N·O, N·O) float64 matrix."""
    if not isinstance(k, torch.Tensor) or k.dim() not in (2, 4) or k.shape[0] != k.shape[1] or (
            k.dim() == 4 and k.shape[2] != k.shape[3]):
        raise ShapeMismatchError(f"{name} must be a square kernel (N, N) or (N, N, O, O), got "
                                 f"{getattr(k, 'shape', type(k).__name__)}.")
    if k.dim() == 4:
        n, _, o, _ = k.shape
        k = k.permute(0, 2, 1, 3).reshape(n * o, n * o)
    k = k.detach().to(torch.float64)
    if not bool(torch.isfinite(k).all()):
        raise DataError(f"{name} contains NaN or inf.")
    return k


@dataclass(frozen=True)
class KernelSpectrum:
    """Eigenvalues of a kernel matrix, largest first, and summaries of them.

    Attributes
    ----------
    values : Tensor (N,)
        Eigenvalues λ_1 ≥ … ≥ λ_N (float64; tiny negative values are rounding).
    condition_number : float
        λ_1 / λ_N (inf when λ_N ≤ 0).
    effective_rank : float
        (Σλ)² / Σλ², the participation ratio of the spectrum.
    trace : float
    """

    values: torch.Tensor
    condition_number: float
    effective_rank: float
    trace: float

    def to_dict(self) -> dict:
        return {"values": [float(v) for v in self.values], "condition_number":
                self.condition_number, "effective_rank": self.effective_rank,
                "trace": self.trace, "largest": float(self.values[0]),
                "smallest": float(self.values[-1])}

    def plot(self, ax=None, *, label: str | None = None):
        """Eigenvalues against their rank, log–log."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(5, 3.5)
        positive = self.values[self.values > 0]
        ax.loglog(torch.arange(1, positive.numel() + 1).numpy(), positive.numpy(), label=label)
        ax.set_xlabel("rank i")
        ax.set_ylabel("eigenvalue λ_i")
        if label:
            ax.legend()
        return ax


def spectrum(K: torch.Tensor) -> KernelSpectrum:
    """The eigen-spectrum of a symmetric kernel matrix.

    A full kernel (N, N, O, O) is treated as the (N·O, N·O) matrix it represents. Computed
    with ``torch.linalg.eigvalsh`` in float64.
    """
    k = _square(K)
    values = torch.linalg.eigvalsh((k + k.T) / 2).flip(0)
    top, bottom = float(values[0]), float(values[-1])
    total = float(values.sum())
    squares = float((values ** 2).sum())
    return KernelSpectrum(values=values, condition_number=top / bottom if bottom > 0 else float("inf"),
                          effective_rank=total ** 2 / squares if squares > 0 else 0.0, trace=total)


def _label_matrix(y: torch.Tensor, n: int, outputs: int | None) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() not in (1, 2) or y.shape[0] != n:
        raise ShapeMismatchError(f"y must have one row per example of the kernel, shape ({n},) or "
                                 f"({n}, O); got {getattr(y, 'shape', type(y).__name__)}.")
    if not y.is_floating_point():
        classes = outputs or int(y.max()) + 1
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise DataError(f"labels must lie in [0, {classes}), got range [{int(y.min())}, "
                            f"{int(y.max())}].")
        return torch.nn.functional.one_hot(y, classes).to(torch.float64)
    return (y[:, None] if y.dim() == 1 else y).to(torch.float64)


def alignment(K: torch.Tensor, y: torch.Tensor, *, centered: bool = False) -> float:
    """Kernel-target alignment A = ⟨K, Y Yᵀ⟩_F / (‖K‖_F ‖Y Yᵀ‖_F).

    Y is y as a matrix (N, O): integer labels are one-hot encoded, a vector becomes one
    column. For a full kernel (N, N, O, O) the target is Y_{ao} Y_{bq} in the same layout.
    A ∈ [−1, 1]; 1 when K ∝ Y Yᵀ. ``centered=True`` first centres both kernels,
    K ← H K H with H = I − 11ᵀ/N (Cortes, Mohri & Rostamizadeh 2012), which removes the
    constant offset that dominates the uncentred alignment of one-hot targets.

    References
    ----------
    Cristianini, Shawe-Taylor, Elisseeff & Kandola (2001), "On kernel-target alignment";
    Cortes, Mohri & Rostamizadeh (2012), "Algorithms for learning kernels based on
    centered alignment".
    """
    if not isinstance(K, torch.Tensor):
        raise ShapeMismatchError(f"K must be a tensor, got {type(K).__name__}.")
    outputs = int(K.shape[2]) if K.dim() == 4 else None
    k = _square(K)
    target = _label_matrix(y.to(k.device), int(K.shape[0]), outputs)
    if outputs is not None:
        if target.shape[1] != outputs:
            raise ShapeMismatchError(f"the kernel has {outputs} outputs per example but y has "
                                     f"{target.shape[1]} columns.")
        target = target.reshape(-1, 1)
    t = target @ target.T
    if centered:
        k, t = _center(k), _center(t)
    denominator = torch.linalg.norm(k) * torch.linalg.norm(t)
    return float((k * t).sum() / denominator) if denominator > 0 else 0.0


def _center(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _pair(k1: torch.Tensor, k2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, k in (("K1", k1), ("K2", k2)):
        if not isinstance(k, torch.Tensor):
            raise ShapeMismatchError(f"{name} must be a tensor, got {type(k).__name__}.")
    if k1.shape != k2.shape:
        raise ShapeMismatchError(f"K1 has shape {tuple(k1.shape)} but K2 {tuple(k2.shape)}; "
                                 "compare kernels on the same inputs.")
    a, b = k1.detach().to(torch.float64), k2.detach().to(torch.float64).to(k1.device)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise DataError("the kernels contain NaN or inf.")
    return a, b


def drift(K1: torch.Tensor, K2: torch.Tensor) -> float:
    """Kernel drift 1 − ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F) between two kernels on the same inputs.

    0 when one is a positive multiple of the other (a change of scale is not drift); it
    shrinks with width as the NTK freezes during training (the lazy regime).

    References
    ----------
    Jacot, Gabriel & Hongler (2018); Fort et al. (2020), "Deep learning versus kernel
    learning: an empirical study of loss landscape geometry and the time evolution of the
    Neural Tangent Kernel" (kernel distance).
    """
    a, b = _pair(K1, K2)
    denominator = torch.linalg.norm(a) * torch.linalg.norm(b)
    return float(1 - (a * b).sum() / denominator) if denominator > 0 else 0.0


def relative_error(K: torch.Tensor, reference: torch.Tensor) -> float:
    """‖K − K_ref‖_F / ‖K_ref‖_F, e.g. of an empirical NTK against its infinite-width limit."""
    a, b = _pair(K, reference)
    norm = torch.linalg.norm(b)
    return float(torch.linalg.norm(a - b) / norm) if norm > 0 else float("inf")
