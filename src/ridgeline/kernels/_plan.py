"""Memory and cost model of the empirical NTK: choose a method and a tile size up front.

Internal to :mod:`ridgeline.kernels.ntk`. Every estimate is in bytes (or multiply-add
flops) from the facts of one probe example, so a request over the memory budget fails
before any work, naming a chunk size that fits.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from ridgeline.errors import ConfigError, MemoryBudgetError
from ridgeline.kernels._jacobians import ModelFacts

__all__ = ["NTKPlan", "make_plan", "parse_bytes", "default_budget", "format_bytes"]

#: largest tile side chosen automatically (bigger tiles gain little matmul efficiency)
MAX_AUTO_CHUNK = 1024
#: largest number of examples whose Jacobians are computed at once when all are kept
MAX_JACOBIAN_CHUNK = 4096
#: estimates are multiplied by this (allocator slack, small temporaries not modelled)
MARGIN = 1.1
#: smallest tile side at which holding every example's Jacobian beats recomputing them
MIN_RESIDENT_CHUNK = 64
#: tiles of a symmetric kernel have at most max(SYMMETRIC_TILE, N / SYMMETRIC_TILES) examples
#: a side, so that only the fraction (T + 1)/2T of tiles on and above the diagonal is computed
SYMMETRIC_TILES = 8
SYMMETRIC_TILE = 128

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from a number or a string such as ``"4GiB"``, ``"512 MB"``, ``"2e9"``."""
    if isinstance(value, bool):
        raise ConfigError(f"memory_budget must be a number of bytes or a size such as '4GiB', got {value!r}.")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory_budget {value!r} is not a size; use bytes or a string such "
                              "as '4GiB', '512MiB' or '2GB'.")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"memory_budget must be positive, got {value!r}.")
    return int(number)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def default_budget(device: torch.device) -> int:
    """Memory the NTK may use when no budget is given: 90% of the free memory of a CUDA
    device, or half of the host's available memory (``MemAvailable``; 4 GiB if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2 ** 30


@dataclass(frozen=True)
class NTKPlan:
    """How :func:`empirical_ntk` will compute a kernel, decided before any work.

    Attributes
    ----------
    method : {"jacobian", "ntk_vp"}
    chunk_size : int
        Examples per tile side.
    resident : bool
        Jacobian method only: every example's Jacobian is held at once (computed once);
        otherwise the column Jacobians are recomputed for each row tile.
    tangent_chunk : int
        NTK-vector products only: tangents pushed through ``jvp`` at once.
    jacobian_chunk : int
        Examples whose Jacobians are computed at once (larger than ``chunk_size`` when
        every Jacobian is kept and the budget allows).
    estimated_bytes, memory_budget, output_bytes : int
        Peak memory estimate (output included), the budget, and the output alone.
    estimated_flops : dict
        Multiply-add estimate of each feasible method (the cheaper one wins under "auto").
    notes : tuple of str
        E.g. that attention runs on the MATH backend of ``scaled_dot_product_attention``
        (per-example vmap and forward mode need it).
    """

    method: str
    chunk_size: int
    resident: bool
    tangent_chunk: int
    jacobian_chunk: int
    estimated_bytes: int
    memory_budget: int
    output_bytes: int
    estimated_flops: dict
    n1: int
    n2: int
    symmetric: bool
    full: bool
    num_outputs: int
    num_params: int
    factored_layers: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["factored_layers"] = list(self.factored_layers)
        out["notes"] = list(self.notes)
        return out


# ----------------------------------------------------------------------------- estimates
class _Model:
    """Byte and flop counts of both methods for one request."""

    def __init__(self, facts: ModelFacts, n1: int, n2: int, symmetric: bool, full: bool) -> None:
        self.f, self.n1, self.n2, self.sym, self.full = facts, n1, n2, symmetric, full
        o, s = facts.num_outputs, facts.itemsize
        self.o, self.s = o, s
        self.output = n1 * n2 * (o * o if full else 1) * s
        self.feature = (o * facts.dense_params + facts.factored_features) * s  # per example
        # backward keeps the activations and O cotangents of them; the raw Jacobians and
        # their regrouped/contiguous copies
        self.jac_work = (o + 1) * facts.activation_bytes + 2 * self.feature
        self.full_jac = o * facts.num_params * s  # per example, nothing factored

    def _pairs(self, c: int) -> float:
        return self.n1 * (self.n1 + c) / 2 if self.sym else self.n1 * self.n2

    def contraction_work(self, c: int) -> int:
        """One tile, a layer's δ product, its input factor, and the symmetrised copy."""
        return c * c * self.s * (3 * self.o * self.o + 1 if self.full else 4)

    def held(self) -> int:
        return (self.n1 + (0 if self.sym else self.n2)) * self.feature

    def jacobian_chunk(self, c: int, budget: int) -> int:
        """Examples per Jacobian computation when all are kept: as many as fit, ≥ c."""
        room = (budget / MARGIN - self.output - self.held()) // max(1, self.jac_work)
        return int(max(c, min(max(self.n1, self.n2), MAX_JACOBIAN_CHUNK, room)))

    def jacobian_bytes(self, c: int, resident: bool, jac_chunk: int | None = None) -> int:
        if resident:
            need = self.output + self.held() + max((jac_chunk or c) * self.jac_work,
                                                   self.contraction_work(c))
        else:
            need = self.output + c * self.feature + max(c * self.jac_work,
                                                        c * self.feature + self.contraction_work(c))
        return int(MARGIN * need)

    def jacobian_flops(self, c: int, resident: bool) -> float:
        f, o = self.f, self.o
        per_jac = f.forward_flops * (1 + 2 * o)
        if resident:
            jacobians = self.n1 + (0 if self.sym else self.n2)
        else:
            tiles = math.ceil(self.n1 / c)
            jacobians = self.n1 + (self.n1 * (tiles + 1) / 2 if self.sym else tiles * self.n2)
        factored = sum(f2.out_features * (o * o if self.full else o) + f2.in_features
                       for f2 in f.linear)
        per_pair = 2 * ((o * o if self.full else o) * f.dense_params + factored)
        return jacobians * per_jac + self._pairs(c) * per_pair

    def vp_fixed(self, c: int) -> int:
        return self.output + c * self.full_jac + 2 * c * c * self.o * self.o * self.s

    def vp_per_tangent(self, c: int) -> int:
        return 2 * c * self.f.activation_bytes

    def vp_bytes(self, c: int, t: int) -> int:
        jac_work = c * ((self.o + 1) * self.f.activation_bytes + self.full_jac)
        return int(MARGIN * (self.vp_fixed(c) + max(jac_work, t * self.vp_per_tangent(c))))

    def vp_tangents(self, c: int, budget: int) -> int:
        room = budget / MARGIN - self.vp_fixed(c)
        return int(max(1, min(c * self.o, room // max(1, self.vp_per_tangent(c)))))

    def vp_flops(self, c: int) -> float:
        f, o = self.f, self.o
        return self.n2 * f.forward_flops * (1 + 2 * o) + self._pairs(c) * o * 3 * f.forward_flops


def _largest(fits, upper: int) -> int:
    """The largest c in [1, upper] with fits(c) (fits is monotone), or 0."""
    if upper < 1 or not fits(1):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _jacobian_choice(m: _Model, budget: int, chunk: int | None, upper: int
                     ) -> tuple[int, bool] | None:
    if chunk is not None:
        for resident in (True, False):
            if m.jacobian_bytes(chunk, resident) <= budget:
                return chunk, resident
        return None
    best_resident = _largest(lambda c: m.jacobian_bytes(c, True) <= budget, upper)
    if best_resident >= min(upper, MIN_RESIDENT_CHUNK):
        return best_resident, True
    best_stream = _largest(lambda c: m.jacobian_bytes(c, False) <= budget, upper)
    if best_stream and (not best_resident or m.jacobian_flops(best_stream, False)
                        < m.jacobian_flops(best_resident, True)):
        return best_stream, False
    return (best_resident, True) if best_resident else None


def _vp_choice(m: _Model, budget: int, chunk: int | None, upper: int) -> tuple[int, int] | None:
    def fits(c: int) -> bool:
        return m.vp_bytes(c, m.vp_tangents(c, budget)) <= budget

    c = chunk if chunk is not None else _largest(fits, upper)
    if not c or not fits(c):
        return None
    return c, m.vp_tangents(c, budget)


def make_plan(facts: ModelFacts, n1: int, n2: int, *, symmetric: bool, full: bool, method: str,
              chunk_size: int | None, memory_budget: int) -> NTKPlan:
    """Choose method, tile size and residency so the estimated peak stays under budget."""
    m = _Model(facts, n1, n2, symmetric, full)
    upper = min(max(n1, n2), MAX_AUTO_CHUNK)
    if symmetric:
        upper = min(upper, max(SYMMETRIC_TILE, math.ceil(n1 / SYMMETRIC_TILES)))
    methods = ("jacobian", "ntk_vp") if method == "auto" else (method,)
    options: dict[str, tuple] = {}
    if "jacobian" in methods:
        choice = _jacobian_choice(m, memory_budget, chunk_size, upper)
        if choice is not None:
            c, resident = choice
            jac_chunk = m.jacobian_chunk(c, memory_budget) if resident else c
            options["jacobian"] = (m.jacobian_flops(c, resident), c, resident, 0,
                                   m.jacobian_bytes(c, resident, jac_chunk), jac_chunk)
    if "ntk_vp" in methods:
        choice = _vp_choice(m, memory_budget, chunk_size, upper)
        if choice is not None:
            c, t = choice
            options["ntk_vp"] = (m.vp_flops(c), c, False, t, m.vp_bytes(c, t), c)
    if not options:
        raise MemoryBudgetError(_over_budget(m, methods, memory_budget, chunk_size, upper))
    chosen = min(options, key=lambda k: options[k][0])
    flops, c, resident, t, need, jac_chunk = options[chosen]
    return NTKPlan(method=chosen, chunk_size=c, resident=resident, tangent_chunk=t,
                   jacobian_chunk=jac_chunk,
                   estimated_bytes=int(need), memory_budget=int(memory_budget),
                   output_bytes=int(m.output),
                   estimated_flops={k: float(v[0]) for k, v in options.items()},
                   n1=n1, n2=n2, symmetric=symmetric, full=full, num_outputs=facts.num_outputs,
                   num_params=facts.num_params,
                   factored_layers=tuple(f.module for f in facts.factors))


def _over_budget(m: _Model, methods: tuple[str, ...], budget: int, chunk: int | None,
                 upper: int) -> str:
    shape = f"({m.n1}, {m.n2}{f', {m.o}, {m.o}' if m.full else ''})"
    head = (f"the empirical NTK {shape} of a model with {m.f.num_params:,} parameters and "
            f"{m.o} outputs does not fit memory_budget={format_bytes(budget)}")
    if m.output > budget:
        return (f"{head}: the output alone takes {format_bytes(m.output)}. Use trace='sum' or "
                "'mean' (an N1×N2 kernel instead of N1×N2×O×O), fewer examples, or a larger "
                "memory_budget.")
    fits = []
    if "jacobian" in methods:
        c = _largest(lambda c: min(m.jacobian_bytes(c, True), m.jacobian_bytes(c, False)) <= budget,
                     upper)
        if c:
            fits.append(("jacobian", c))
    if "ntk_vp" in methods:
        c = _largest(lambda c: m.vp_bytes(c, m.vp_tangents(c, budget)) <= budget, upper)
        if c:
            fits.append(("ntk_vp", c))
    if chunk is not None and fits:
        need = min((m.jacobian_bytes(chunk, False) if k == "jacobian" else
                    m.vp_bytes(chunk, 1)) for k in methods)
        options = " or ".join(f"chunk_size={c}" + (f" with method='{k}'" if len(methods) > 1 else "")
                              for k, c in fits)
        return (f"{head} with chunk_size={chunk}: it needs about {format_bytes(need)} (output "
                f"{format_bytes(m.output)}). {options} fits the budget.")
    smallest = min(m.jacobian_bytes(1, False) if "jacobian" in methods else math.inf,
                   m.vp_bytes(1, 1) if "ntk_vp" in methods else math.inf)
    return (f"{head}: even chunk_size=1 needs about {format_bytes(smallest)} (output "
            f"{format_bytes(m.output)}, one example's Jacobian "
            f"{format_bytes(m.full_jac if methods == ('ntk_vp',) else m.feature)}). Use fewer "
            "examples, trace='sum', or a larger memory_budget.")
