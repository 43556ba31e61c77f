"""Random linear maps P: R^d → R^D from a small subspace into parameter space.

Three kinds, as in Li et al. (2018), "Measuring the intrinsic dimension of objective
landscapes", §2 and Supplementary S8:

* ``"dense"``: P has i.i.d. N(0, 1) entries and every column is rescaled to unit norm.
  Memory D·d numbers, time O(D·d) per product.
* ``"sparse"``: the very sparse random projection of Li, Hastie & Church (2006) (the
  Achlioptas (2003) construction with s = √D): an entry is ±1 with probability 1/(2s) each
  and 0 otherwise; columns are rescaled to unit norm. Stored as index arrays, memory and
  time O(d·√D).
* ``"fastfood"``: the Fastfood transform of Le, Sarlós & Smola (2013), stacked
  ⌈D / d_pad⌉ times: block i is V_i = H G_i Π_i H B_i with H the d_pad × d_pad
  Walsh–Hadamard matrix (d_pad = 2^⌈log₂ d⌉), B_i random signs, Π_i a random permutation
  and G_i Gaussian. Never materialised: time O(D log d), memory O(D).

Every projection is an ``nn.Module`` whose random state lives in non-persistent buffers
(it is rebuilt from the seed, so checkpoints stay small) and whose forward maps
z of shape (..., d) to P z of shape (..., D), differentiably in z.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ridgeline.errors import ConfigError, MemoryBudgetError
from ridgeline.params import make_generator

__all__ = ["Projection", "DenseProjection", "SparseProjection", "FastfoodProjection",
           "make_projection", "fwht", "PROJECTIONS", "projection_bytes"]

PROJECTIONS = ("dense", "orthogonal", "sparse", "fastfood")


_FACTOR_BITS = 6  # Hadamard factors of at most 64 × 64, applied as small matrix products
_HADAMARD_CACHE: dict[tuple, torch.Tensor] = {}


def _hadamard(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_k by the parity rule H[i, j] = (−1)^popcount(i AND j) (Sylvester order)."""
    key = (k, dtype, str(device))
    if key not in _HADAMARD_CACHE:
        idx = torch.arange(k)
        bits = idx[:, None] & idx[None, :]
        parity = torch.zeros_like(bits)
        while bool(bits.any()):
            parity ^= bits & 1
            bits = bits >> 1
        _HADAMARD_CACHE[key] = (1 - 2 * parity).to(dtype=dtype, device=device)
    return _HADAMARD_CACHE[key]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """The (unnormalised) fast Walsh–Hadamard transform along the last axis.

    Returns H x with H the n × n Sylvester–Hadamard matrix (H_1 = [1],
    H_2m = [[H_m, H_m], [H_m, −H_m]]), n a power of two. H symmetric and H H = n I.

    Uses H_n = H_{k_1} ⊗ … ⊗ H_{k_r} with factors k_j ≤ 64: x is viewed as an
    r-dimensional array and each axis is multiplied by its small H_{k_j} (one batched
    matrix product per factor). That is O(n log n) work (≤ 64/6 multiply-adds per element
    per level of log₂ n) in O(n) memory, and runs as GEMMs rather than log₂ n
    memory-bound butterfly passes. Any leading batch shape; works under autograd and
    ``torch.func`` transforms (H is a constant).
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ConfigError(f"the Walsh–Hadamard transform needs a power-of-two length, got {n}.")
    if n == 1:
        return x
    bits = n.bit_length() - 1
    parts = -(-bits // _FACTOR_BITS)
    base, extra = divmod(bits, parts)
    sizes = [1 << (base + (1 if i < extra else 0)) for i in range(parts)]
    lead = x.shape[:-1]
    y = x.reshape(-1, sizes[-1]) @ _hadamard(sizes[-1], x.dtype, x.device)
    right = sizes[-1]
    for k in reversed(sizes[:-1]):
        y = torch.matmul(_hadamard(k, x.dtype, x.device), y.reshape(-1, k, right))
        right *= k
    return y.reshape(*lead, n)


def projection_bytes(kind: str, num_params: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the projection's random state takes (expected for ``"sparse"``)."""
    item = torch.empty((), dtype=dtype).element_size()
    if kind in ("dense", "orthogonal"):
        return num_params * dim * item
    if kind == "sparse":
        nnz = dim * max(1.0, math.sqrt(num_params))
        return int(nnz * (2 * 8 + item))
    if kind == "fastfood":
        d_pad = 1 << max(0, (dim - 1).bit_length())
        rows = math.ceil(num_params / d_pad) * d_pad
        return rows * (2 * item + 8)
    raise ConfigError(f"unknown projection {kind!r}; choose one of {list(PROJECTIONS)}.")


class Projection(nn.Module):
    """A fixed linear map z ↦ P z from R^d (``dim``) to R^D (``num_params``).

    Subclasses implement ``forward(z)`` for z of shape (..., d).
    """

    kind: str = "projection"

    def __init__(self, num_params: int, dim: int) -> None:
        super().__init__()
        self.num_params, self.dim = int(num_params), int(dim)

    def materialize(self, chunk_size: int = 256) -> torch.Tensor:
        """The D × d matrix, column block by column block (for small cases and tests)."""
        device = next(iter(self.buffers())).device
        dtype = self.dtype
        cols = []
        with torch.no_grad():
            for start in range(0, self.dim, chunk_size):
                stop = min(start + chunk_size, self.dim)
                eye = torch.zeros(stop - start, self.dim, device=device, dtype=dtype)
                eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
                cols.append(self(eye).T)
        return torch.cat(cols, dim=1)

    @property
    def dtype(self) -> torch.dtype:
        return next(b for b in self.buffers() if b.is_floating_point()).dtype

    def memory_bytes(self) -> int:
        """Bytes held by the projection's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"D={self.num_params}, d={self.dim}"


class DenseProjection(Projection):
    """P with i.i.d. Gaussian entries and unit-norm columns (``orthogonal=True``:
    orthonormal columns, the Q factor of a Gaussian matrix; needs d ≤ D).

    Pass ``matrix`` (D × d) to use an explicit projection instead of a random one.
    """

    kind = "dense"

    def __init__(self, num_params: int, dim: int, *, seed: int | torch.Generator | None = 0,
                 orthogonal: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 matrix: torch.Tensor | None = None) -> None:
        super().__init__(num_params, dim)
        if matrix is None:
            gen = make_generator(seed)
            matrix = torch.randn(num_params, dim, generator=gen,
                                 dtype=torch.float64 if orthogonal else dtype)
            if orthogonal:
                matrix = torch.linalg.qr(matrix).Q
            matrix /= matrix.norm(dim=0, keepdim=True)
        elif tuple(matrix.shape) != (num_params, dim):
            raise ConfigError(f"the explicit projection matrix has shape {tuple(matrix.shape)}; "
                              f"it must be (num_params, dim) = ({num_params}, {dim}).")
        self.kind = "orthogonal" if orthogonal else "dense"
        self.register_buffer("matrix", matrix.to(device=device, dtype=dtype), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix.T

    def materialize(self, chunk_size: int = 256) -> torch.Tensor:
        return self.matrix.detach().clone()


class SparseProjection(Projection):
    """Very sparse random projection (Li, Hastie & Church 2006; Achlioptas 2003).

    Each entry is nonzero with probability 1/s, s = √D (``density`` overrides 1/s), with a
    random sign; every column is then scaled to unit norm (a column with no nonzero entry
    gets one at a random row, so no direction of z is dead). The nonzeros are drawn
    exactly as i.i.d. Bernoulli entries by skipping geometric gaps through the D·d
    positions, so generation costs O(nnz), not O(D·d). Stored as (row, column, value)
    arrays; P z is an ``index_add`` in O(nnz) time.
    """

    kind = "sparse"

    def __init__(self, num_params: int, dim: int, *, seed: int | torch.Generator | None = 0,
                 density: float | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_params, dim)
        p = min(1.0, 1.0 / math.sqrt(num_params)) if density is None else float(density)
        if not 0 < p <= 1:
            raise ConfigError(f"density must lie in (0, 1], got {density}.")
        self.density = p
        gen = make_generator(seed)
        flat = _bernoulli_positions(num_params * dim, p, gen)
        cols, rows = flat // num_params, flat % num_params
        counts = torch.bincount(cols, minlength=dim)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            extra = torch.randint(0, num_params, (empty.numel(),), generator=gen)
            rows, cols = torch.cat([rows, extra]), torch.cat([cols, empty])
            counts[empty] = 1
        signs = torch.randint(0, 2, (rows.numel(),), generator=gen).to(torch.float64) * 2 - 1
        values = signs / counts[cols].to(torch.float64).sqrt()
        self.register_buffer("rows", rows.to(device), persistent=False)
        self.register_buffer("cols", cols.to(device), persistent=False)
        self.register_buffer("values", values.to(device=device, dtype=dtype), persistent=False)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        contributions = z[..., self.cols] * self.values
        out = z.new_zeros(*z.shape[:-1], self.num_params)
        return out.index_add(-1, self.rows, contributions)


def _bernoulli_positions(total: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted positions of the ones in ``total`` i.i.d. Bernoulli(p) trials, drawn as
    cumulative sums of Geometric(p) gaps (O(number of ones) time and memory)."""
    if p >= 1.0:
        return torch.arange(total)
    log_q = math.log1p(-p)
    expected = total * p
    chunks, position = [], -1
    while position < total:
        size = int(expected + 6 * math.sqrt(expected + 1) + 16)
        u = torch.rand(size, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        gaps = torch.floor(torch.log(u) / log_q).to(torch.int64) + 1
        positions = position + torch.cumsum(gaps, 0)
        chunks.append(positions[positions < total])
        position = int(positions[-1])
    return torch.cat(chunks)


class FastfoodProjection(Projection):
    """Stacked Fastfood blocks (Le, Sarlós & Smola 2013) as used by Li et al. (2018).

    z ∈ R^d is zero-padded to d_pad = 2^⌈log₂ d⌉. With n = ⌈D / d_pad⌉ blocks,

        P z = [c_1 V_1 z; …; c_n V_n z]_{1:D} · √(d_pad / D),
        V_i = H G_i Π_i H B_i,   c_i = 1 / √(d_pad ‖G_i‖²),

    where H is the Walsh–Hadamard matrix (:func:`fwht`), B_i = diag(±1), Π_i a
    permutation and G_i = diag(N(0, 1)). Every column of c_i V_i has norm exactly 1 (as
    does every row), so every column of P has norm exactly 1 when d_pad divides D, and
    mean squared column norm 1 otherwise (the last block is cut). Time O(D log d_pad) and
    memory O(D) per product: the D × d matrix is never formed. The buffer ``gauss``
    holds G_i already multiplied by c_i √(d_pad / D).
    """

    kind = "fastfood"

    def __init__(self, num_params: int, dim: int, *, seed: int | torch.Generator | None = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(num_params, dim)
        self.d_pad = 1 << max(0, (dim - 1).bit_length())
        self.blocks = math.ceil(num_params / self.d_pad)
        gen = make_generator(seed)
        shape = (self.blocks, self.d_pad)
        signs = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        perm = torch.argsort(torch.rand(shape, generator=gen), dim=-1)
        gauss = torch.randn(shape, generator=gen, dtype=torch.float64)
        # c_i √(d_pad / D) folded into G_i: one multiply less per product
        scale = torch.rsqrt(self.d_pad * (gauss ** 2).sum(-1, keepdim=True))
        gauss = gauss * scale * math.sqrt(self.d_pad / num_params)
        self.register_buffer("signs", signs.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device=device, dtype=dtype), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        padded = nn.functional.pad(z, (0, self.d_pad - self.dim))
        x = fwht(padded.unsqueeze(-2) * self.signs)                   # H B_i z
        x = x.gather(-1, self.perm.expand(*lead, -1, -1))             # Π_i
        x = fwht(x * self.gauss)                                      # c_i H G_i (scaled G)
        return x.reshape(*lead, self.blocks * self.d_pad)[..., :self.num_params]


def make_projection(kind: str | Projection, num_params: int, dim: int, *,
                    seed: int | torch.Generator | None = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None,
                    memory_budget: int | None = None) -> Projection:
    """Build a projection by name (``"dense"``, ``"orthogonal"``, ``"sparse"``,
    ``"fastfood"``), checking its memory against ``memory_budget`` (bytes) first."""
    if isinstance(kind, Projection):
        if (kind.num_params, kind.dim) != (num_params, dim):
            raise ConfigError(f"the projection maps R^{kind.dim} to R^{kind.num_params}, but the "
                              f"subspace model needs R^{dim} to R^{num_params}.")
        return kind.to(device=device, dtype=dtype)
    if kind not in PROJECTIONS:
        raise ConfigError(f"unknown projection {kind!r}; choose one of {list(PROJECTIONS)}.")
    needed = projection_bytes(kind, num_params, dim, dtype)
    if memory_budget is not None and needed > memory_budget:
        raise MemoryBudgetError(
            f"a {kind} projection from d={dim} to D={num_params} parameters needs "
            f"{needed / 2**20:.1f} MiB, over the memory budget of {memory_budget / 2**20:.1f} MiB; "
            "use projection='fastfood' or 'sparse' (O(D) memory), lower dim, or raise memory_budget.")
    if kind in ("dense", "orthogonal"):
        return DenseProjection(num_params, dim, seed=seed, orthogonal=kind == "orthogonal",
                               dtype=dtype, device=device)
    if kind == "sparse":
        return SparseProjection(num_params, dim, seed=seed, dtype=dtype, device=device)
    return FastfoodProjection(num_params, dim, seed=seed, dtype=dtype, device=device)
