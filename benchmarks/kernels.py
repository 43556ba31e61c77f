"""Empirical NTK: ridgeline vs the torch.func tutorial recipes, nngeometry and neural-tangents.

Same MNIST-1D inputs and the same weights for every library: the MNIST-1D MLP
(40-256-256-10, 78,858 parameters) and CNN (three stride-2 conv layers of 32 channels and a
linear head, 6,666 parameters), N = 256 and 1024 examples, the traced kernel (N, N)
(Σ over the 10 outputs) and the full kernel (N, N, 10, 10).

Peers
-----
* torch.func "jacobian contraction" and "NTK-vector products": the two recipes of the
  PyTorch tutorial "Neural Tangent Kernels", written out below as the tutorial gives them.
  The NTK-vector-product recipe vmaps over all N² pairs at once (memory N²·O·P floats), so
  it is run on blocks of rows of x1 sized to ``--max-memory`` — the way a user would apply it.
* nngeometry ``GramMatrix`` (pip ``nngeometry``, installed with ``--no-deps`` so torch stays
  as it is): it only computes the full (O, N, O, N) Gram matrix; its time is shown for the
  traced kernel too (a user must compute the full kernel and trace it).
* neural-tangents ``empirical_ntk_fn(implementation=AUTO)`` (JAX): run in a subprocess of a
  separate environment given by ``--neural-tangents-python`` or ``$RIDGELINE_NT_PYTHON``
  (see docs/kernels.md for the install), on the same inputs and weights saved to an .npz;
  its traced kernel averages over outputs and is multiplied by O here.

Time: the median wall time of ``--repeats`` calls (one call for N ≥ 1024), after a first
call that measures memory and warms up; JAX compilation is excluded. Memory: peak resident-set
growth of the process during one extra call made first (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus the RSS before the call, with glibc set to return
freed memory so the RSS follows allocations) — it includes the output. Every torch peer first runs once at
``--probe-n`` examples (not shown); a peer whose time at a size, projected from the last
size it ran at by N², exceeds ``--max-seconds`` is skipped and says so (as is a torch.func
recipe whose memory by its known formula, or a neural-tangents full kernel whose memory
projected by N², exceeds ``--max-memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from benchmarks.harness import Row, Skip, peer_available, print_table

# ----------------------------------------------------------------------------- memory


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(key)


class _Malloc:
    """glibc settings for the two phases of a measurement.

    Timing runs with a high mmap threshold and trim threshold (freed buffers are reused, as
    in the allocator's default steady state). The memory run uses a low fixed threshold and
    trims the heap first, so that the resident set follows every allocation and its peak
    (``VmHWM``, reset through ``/proc/self/clear_refs``) is the peak of the call."""

    def __init__(self) -> None:
        try:
            import ctypes

            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    def timing(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(-3, 32 * 2 ** 20)  # M_MMAP_THRESHOLD
            self.libc.mallopt(-1, 512 * 2 ** 20)  # M_TRIM_THRESHOLD

    def tracking(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(-3, 128 * 2 ** 10)
            self.libc.mallopt(-1, 128 * 2 ** 10)
            self.libc.malloc_trim(0)


_MALLOC = _Malloc()


def peak_memory(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak growth of the resident set during one call of fn, its result)."""
    _MALLOC.tracking()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _status("VmRSS")
    except OSError:
        before = -1
    result = fn()
    peak = max(0, _status("VmHWM") - before) if before >= 0 else 0
    _MALLOC.timing()
    return peak, result


def measure(fn: Callable[[], object], *, repeats: int, warmup: int) -> tuple[float, int, object]:
    """(median seconds over ``repeats`` timed calls, peak RSS growth of one more call, result).

    The memory call comes first and doubles as the warm-up; a call slower than 2 s is
    timed once."""
    began = time.perf_counter()
    peak, result = peak_memory(fn)
    if time.perf_counter() - began > 2.0:
        repeats = 1
    for _ in range(warmup):
        result = None
        result = fn()
    times = []
    for _ in range(repeats):
        result = None
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), peak, result


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


# ----------------------------------------------------------------------------- torch.func recipes
# From the PyTorch tutorial "Neural Tangent Kernels" (torch.func), unchanged apart from names.


def recipe_jacobian_contraction(fnet_single, params, x1, x2, compute="full"):
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = jac1.values()
    jac1 = [j.flatten(2) for j in jac1]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = jac2.values()
    jac2 = [j.flatten(2) for j in jac2]
    einsum_expr = None
    if compute == "full":
        einsum_expr = "Naf,Mbf->NMab"
    elif compute == "trace":
        einsum_expr = "Naf,Maf->NM"
    result = torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in zip(jac1, jac2)])
    result = result.sum(0)
    return result


def recipe_ntk_vps(func, params, x1, x2, compute="full"):
    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)
    if compute == "full":
        return result
    if compute == "trace":
        return torch.einsum("NMKK->NM", result)


def _fnet_single(model):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return fnet_single, params


def run_jacobian_recipe(model, x, kind):
    fnet, params = _fnet_single(model)
    with torch.no_grad():
        return recipe_jacobian_contraction(fnet, params, x, x, kind)


def run_ntk_vps_recipe(model, x, kind, block):
    """The recipe on blocks of ``block`` rows of x1 (all of x2 each time)."""
    fnet, params = _fnet_single(model)
    with torch.no_grad():
        parts = [recipe_ntk_vps(fnet, params, x[i:i + block], x, kind)
                 for i in range(0, x.shape[0], block)]
    return torch.cat(parts)


# ----------------------------------------------------------------------------- nngeometry
def run_nngeometry(model, x, y, kind):
    from nngeometry import GramMatrix

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    gram = GramMatrix(model, loader).data  # (O, N, O, N)
    full = gram.permute(1, 3, 0, 2)
    return full if kind == "full" else full.diagonal(dim1=2, dim2=3).sum(-1)


# ----------------------------------------------------------------------------- neural-tangents
NT_SCRIPT = r'''
import ctypes, json, os, sys, time, types
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 32 * 2 ** 20)
libc.mallopt(-1, 512 * 2 ** 20)
sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")
import numpy as np, jax, jax.numpy as jnp
import neural_tangents as nt

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
data = np.load(args["npz"])
names = json.loads(str(data["names"]))
params = {k: jnp.asarray(data["p_" + k]) for k in names}
x = jnp.asarray(data["x"])

def mlp(p, x):
    layers = sorted({k.split(".")[0] for k in p}, key=int)
    for i, layer in enumerate(layers):
        x = x @ p[layer + ".weight"].T + p[layer + ".bias"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x

def cnn(p, x):
    x = x[:, None, :]
    convs = sorted({k.split(".")[0] for k in p if p[k].ndim == 3}, key=int)
    for layer in convs:
        x = jax.lax.conv_general_dilated(x, p[layer + ".weight"], (2,), [(1, 1)],
                                         dimension_numbers=("NCH", "OIH", "NCH"))
        x = jax.nn.relu(x + p[layer + ".bias"][None, :, None])
    x = x.mean(-1)
    head = [k.split(".")[0] for k in p if p[k].ndim == 2][0]
    return x @ p[head + ".weight"].T + p[head + ".bias"]

apply = {"mlp": mlp, "cnn": cnn}[args["model"]]
trace_axes = (-1,) if args["kind"] == "trace" else ()
fn = jax.jit(nt.empirical_ntk_fn(apply, trace_axes=trace_axes, vmap_axes=0,
                                 implementation=nt.NtkImplementation.AUTO))
out = fn(x, None, params).block_until_ready()  # compile + warm-up
del out
libc.mallopt(-3, 128 * 1024)
libc.mallopt(-1, 128 * 1024)
libc.malloc_trim(0)
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
out = fn(x, None, params).block_until_ready()
peak = max(0, status("VmHWM") - before)
libc.mallopt(-3, 32 * 2 ** 20)
libc.mallopt(-1, 512 * 2 ** 20)
del out
times = []
for i in range(args["repeats"]):
    began = time.perf_counter()
    out = fn(x, None, params).block_until_ready()
    times.append(time.perf_counter() - began)
out = np.asarray(out)
if args["kind"] == "trace":
    out = out * args["outputs"]  # neural-tangents averages over trace axes
np.save(args["out"], out)
print(json.dumps({"seconds": float(np.median(times)), "peak": int(peak), "jax": jax.__version__,
                  "nt": getattr(nt, "__version__", "?")}))
'''


def run_neural_tangents(python: str, model, name: str, x, kind: str, repeats: int,
                        workdir: Path) -> tuple[float, int, torch.Tensor, str]:
    params = {k: v.detach().numpy() for k, v in model.named_parameters()}
    npz = workdir / f"{name}-{x.shape[0]}.npz"
    np.savez(npz, x=x.numpy(), names=json.dumps(list(params)),
             **{f"p_{k}": v for k, v in params.items()})
    out = workdir / f"nt-{name}-{x.shape[0]}-{kind}.npy"
    args = {"npz": str(npz), "model": name, "kind": kind, "repeats": repeats, "out": str(out),
            "outputs": 10}
    done = subprocess.run([python, "-c", NT_SCRIPT, json.dumps(args)], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no message)"]
        errors = [line for line in lines if "Error" in line or "RESOURCE_EXHAUSTED" in line]
        if done.returncode < 0:
            errors.append(f"killed by signal {-done.returncode} (out of memory?)")
        raise Skip("neural-tangents failed: " + (errors or lines)[-1][:160])
    info = json.loads(done.stdout.strip().splitlines()[-1])
    kernel = torch.from_numpy(np.load(out))
    out.unlink()
    return info["seconds"], info["peak"], kernel, f"jax {info['jax']}"


# ----------------------------------------------------------------------------- driver
def _models():
    from ridgeline.models import cnn1d, mlp

    torch.manual_seed(0)
    return {"mlp": mlp(40, [256, 256], 10).eval(), "cnn": cnn1d().eval()}


def _agreement(kernel: torch.Tensor, reference: torch.Tensor) -> str:
    kernel = kernel.to(reference.dtype).reshape(reference.shape)
    return f"max rel. err {float((kernel - reference).abs().max() / reference.abs().max()):.1e}"


class Bench:
    """Runs every library on one case and remembers times to project the next size."""

    def __init__(self, args) -> None:
        self.args = args
        self.max_memory = args.max_memory * 2 ** 30
        self.rows: list[Row] = []
        self.last: dict[tuple, tuple[int, float, int]] = {}
        self.probing = False
        self.workdir = Path(tempfile.mkdtemp(prefix="ridgeline-ntk-bench-"))
        self.nt_python = args.neural_tangents_python

    def add(self, row: Row) -> None:
        if not self.probing:
            self.rows.append(row)

    def peer(self, case: str, label: str, key: tuple, n: int, run: Callable[[], tuple],
             reference: torch.Tensor, memory_need: float | None = None,
             project_memory: bool = False) -> None:
        if key in self.last:
            n0, t0, peak0 = self.last[key]
            guess = t0 * (n / n0) ** 2
            if guess > self.args.max_seconds:
                self.add(Row(case, label, None, f"skipped: projected {guess:.0f} s from "
                             f"N={n0} (N² scaling) > --max-seconds"))
                return
            if project_memory and "full" in case and peak0 * (n / n0) ** 2 > self.max_memory:
                self.add(Row(case, label, None, f"skipped: projected {gib(peak0 * (n / n0) ** 2)}"
                             f" from N={n0} (N² scaling) > --max-memory"))
                return
        if memory_need is not None and memory_need > self.max_memory:
            self.add(Row(case, label, None, f"skipped: needs {gib(memory_need)} > --max-memory"))
            return
        try:
            seconds, peak, kernel = run()
        except Skip as exc:
            self.add(Row(case, label, None, f"skipped: {exc}"))
            return
        self.last[key] = (n, seconds, peak)
        self.add(Row(case, label, seconds, _agreement(kernel, reference),
                             {"peak RSS Δ": gib(peak)}))

    def case(self, name: str, model, x, y, kind: str, nng_cache: dict) -> None:
        from ridgeline.kernels import empirical_ntk, plan_ntk

        n, o, s = int(x.shape[0]), 10, 4
        params = sum(p.numel() for p in model.parameters())
        repeats = self.args.repeats if n < 1024 else 1
        case = f"{name} P={params:,} N={n} {kind}"
        trace = "sum" if kind == "trace" else None
        seconds, peak, ours = measure(lambda: empirical_ntk(model, x, trace=trace),
                                      repeats=repeats, warmup=0)
        plan = plan_ntk(model, x, trace=trace)
        self.add(Row(case, "ridgeline", seconds, f"{plan.method}, est. "
                             f"{gib(plan.estimated_bytes)}", {"peak RSS Δ": gib(peak)}))
        tensors = len(list(model.parameters()))
        jac_need = 2 * n * o * params * s + tensors * n * n * (o * o if kind == "full" else 1) * s
        self.peer(case, "torch.func jacobian recipe", (name, kind, "jac"), n,
                  lambda: measure(lambda: run_jacobian_recipe(model, x, kind), repeats=repeats,
                                  warmup=0), ours, jac_need)
        block = int(self.max_memory // (n * o * params * s * 2))
        if block < 1:
            self.add(Row(case, "torch.func ntk-vps recipe", None,
                         "skipped: one row block exceeds --max-memory"))
        else:
            self.peer(case, "torch.func ntk-vps recipe", (name, kind, "vps"), n,
                      lambda: measure(lambda: run_ntk_vps_recipe(model, x, kind, block),
                                      repeats=1, warmup=0), ours)
        if peer_available("nngeometry"):
            def gram():
                if "full" not in nng_cache:  # one full Gram matrix serves both kinds
                    nng_cache["full"] = measure(lambda: run_nngeometry(model, x, y, "full"),
                                                repeats=1, warmup=0)
                t, pk, full = nng_cache["full"]
                return t, pk, full if kind == "full" else full.diagonal(dim1=2, dim2=3).sum(-1)

            label = "nngeometry GramMatrix" + (" (full, traced)" if kind == "trace" else "")
            self.peer(case, label, (name, "nng"), n, gram, ours)
        else:
            self.add(Row(case, "nngeometry GramMatrix", None,
                         "skipped: pip install --no-deps nngeometry"))
        if self.probing:
            return
        if self.nt_python and Path(self.nt_python).exists():
            self.peer(case, "neural-tangents (AUTO)", (name, kind, "nt"), n,
                      lambda: run_neural_tangents(self.nt_python, model, name, x, kind, repeats,
                                                  self.workdir)[:3], ours, project_memory=True)
        else:
            self.add(Row(case, "neural-tangents", None,
                         "skipped: set --neural-tangents-python (separate venv)"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks kernels")
    parser.add_argument("--sizes", default="256,1024", help="comma-separated N")
    parser.add_argument("--kinds", default="trace,full", help="trace and/or full")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls for N < 1024")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a peer whose projected time exceeds this")
    parser.add_argument("--max-memory", type=float, default=6.0,
                        help="GiB a peer recipe may allocate by its known formula")
    parser.add_argument("--neural-tangents-python", default=os.environ.get("RIDGELINE_NT_PYTHON"))
    parser.add_argument("--probe-n", type=int, default=64,
                        help="run the torch peers once at this N first (not shown) so that "
                             "their time at the table's sizes can be projected")
    parser.add_argument("--large", action="store_true",
                        help="also N=10000 for the MNIST-1D MLP within a 4 GiB budget (ridgeline)")
    args = parser.parse_args(argv)
    from ridgeline.data import mnist1d
    from ridgeline.kernels import empirical_ntk

    _MALLOC.timing()
    data = mnist1d("train")
    models = _models()
    for model in models.values():  # first-call overheads out of the timings
        empirical_ntk(model, data.inputs[:4])
        run_jacobian_recipe(model, data.inputs[:4], "trace")
    bench = Bench(args)
    sizes = [int(v) for v in args.sizes.split(",") if v]
    try:
        for name in [m for m in args.models.split(",") if m]:
            for n in ([args.probe_n] if args.probe_n else []) + sizes:
                bench.probing = n == args.probe_n and n not in sizes
                x, y = data.inputs[:n], data.targets[:n]
                nng_cache: dict = {}
                for kind in [k for k in args.kinds.split(",") if k]:
                    bench.case(name, models[name], x, y, kind, nng_cache)
            bench.probing = False
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    print_table("Empirical NTK (time: median of repeats; peak RSS Δ: growth of resident memory "
                "during the call)", bench.rows)
    if args.large:
        _large()


def _large() -> None:
    """N = 10 000 MNIST-1D examples (the training split of a 12 500-example draw) for the
    MNIST-1D MLP within a 4 GiB budget, timed once."""
    from ridgeline.data import mnist1d
    from ridgeline.kernels import empirical_ntk, plan_ntk
    from ridgeline.models import mlp

    big = mnist1d("train", num_samples=12500)
    x = big.inputs[:10000]
    torch.manual_seed(0)
    model = mlp(40, [256, 256], 10).eval()
    plan = plan_ntk(model, x, memory_budget="4GiB")
    seconds, peak, kernel = measure(lambda: empirical_ntk(model, x, memory_budget="4GiB"),
                                    repeats=1, warmup=0)
    print(f"N=10000 MNIST-1D MLP 40-256-256-10, trace=sum, memory_budget=4GiB: {seconds:.1f} s, "
          f"peak RSS growth {gib(peak)}, planned {gib(plan.estimated_bytes)} "
          f"({plan.method}, chunk {plan.chunk_size}, resident={plan.resident}); kernel "
          f"{tuple(kernel.shape)}, symmetric={bool(torch.equal(kernel, kernel.T))}")


if __name__ == "__main__":
    main(sys.argv[1:])
