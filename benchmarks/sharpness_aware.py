"""Sharpness-aware training on MNIST-1D: SGD vs SAM, ASAM, SAF and MESA (issue 7's evidence).

Three parts, one process, the same data and initialisations for every method:

1. Science (``ridgeline.train`` per method, via the ``sharpness_aware`` measurement's
   ``compare_methods``): test accuracy, top Hessian eigenvalue and adaptive worst-case
   sharpness of the final weights on 1000 training examples, for the MLP 40-256-256-10 and
   the small CNN, several seeds. λ_max is cross-checked against scipy ``eigsh`` on
   ``Objective.hvp`` (and is taken from there when ``ridgeline.curvature`` is absent).
2. Time per step, interleaved: every method's step rule trains its own copy of the model on
   the same batches; the methods take turns every 8 batches in rotating order, so drifts
   of the machine's load hit all of them alike while each model stays warm in its turn. Timed over the epochs where SAF's and MESA's
   penalties are active. A plain-torch SAM loop (the usual
   two-pass recipe, written from Foret et al.'s algorithm) runs alongside as the reference
   implementation and must follow ridgeline's SAM to float precision. "saf, 2 roots" is SAF
   with an opaque loss callable, which takes the unfused path (torch's cross-entropy plus the
   term's gradient as a second backward root) that every loss but class-index cross-entropy
   uses.
3. Memory: SAF's ring-buffer bytes (exact, ``TrajectoryLoss.memory_bytes``), every method's
   extra state, and the sampled peak RSS above the start of each training run.

Run: ``.venv/bin/python -m benchmarks sharpness_aware [--epochs 20 --seeds 1 2 3]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import numpy as np
import torch
from torch import nn

from benchmarks.harness import Row, console, print_table
from ridgeline import Objective
from ridgeline.data import mnist1d
from ridgeline.models import cnn1d, mlp
from ridgeline.optim import TrajectoryLoss
from ridgeline.params import flatten, unflatten
from ridgeline.study.measurements.sharpness_aware import compare_methods
from ridgeline.train import TRAINING_METHODS, MethodContext, _load_method_plugins

METHODS = ["sgd", "sam", "asam", "saf", "mesa"]
BUILDERS = {"mlp": lambda: mlp(40, [256, 256], 10), "cnn1d": lambda: cnn1d()}


def build(name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[name]()


def eigsh_top(model: nn.Module, data, tol: float = 1e-3) -> float:
    """λ_max of the loss Hessian by scipy's ARPACK on Objective.hvp (eval mode)."""
    import scipy.sparse.linalg as sla

    objective = Objective(model, data)
    params = objective.params()
    n = flatten(params).numel()

    def matvec(v):
        tangent = unflatten(torch.as_tensor(v, dtype=torch.float32), params)
        return flatten(objective.hvp(tangent)).double().numpy()

    operator = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    return float(sla.eigsh(operator, k=1, which="LA", tol=tol, v0=np.ones(n))[0][0])


# ----------------------------------------------------------------------------- part 1
def science(models, seeds, epochs, data, probe_size) -> dict:
    train, test = data
    probe = train.subset(probe_size)
    out: dict = {}
    for name in models:
        for seed in seeds:
            began = time.perf_counter()
            result = compare_methods(lambda name=name, seed=seed: build(name, seed), train, test,
                                     methods=METHODS, epochs=epochs, lr=0.05, momentum=0.9,
                                     batch_size=128, seed=seed, subset=probe_size,
                                     on_model=lambda m, net: {"eigsh": eigsh_top(net, probe)})
            out[(name, seed)] = result
            console.print(f"  {name} seed {seed}: {time.perf_counter() - began:.0f} s"
                          + (f"  ({result['notes'][0]})" if result["notes"] else ""))
    return out


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" if abs(mean) < 10 else f"{mean:.2f} ± {std:.2f}"


def science_table(results: dict, models, seeds) -> None:
    rows = []
    for name in models:
        per_seed = [results[(name, s)]["methods"] for s in seeds]
        for method in METHODS:
            col = lambda key, m=method, rs=per_seed: [r[m].get(key) for r in rs]  # noqa: E731
            lam = [r[method]["top_eigenvalue"] if r[method]["top_eigenvalue"] is not None
                   else r[method]["eigsh"] for r in per_seed]
            agree = [abs(r[method]["top_eigenvalue"] - r[method]["eigsh"]) / r[method]["eigsh"]
                     for r in per_seed if r[method]["top_eigenvalue"] is not None]
            below = sum(lm < r["sgd"]["eigsh"] for lm, r in zip(lam, per_seed)) if method != "sgd" else None
            rows.append(Row(name, method, statistics.fmean(col("time_per_step")),
                            f"test acc {_mean_std(col('test_accuracy'))}",
                            {"train loss": _mean_std(col("train_loss")),
                             "λ_max": _mean_std(lam),
                             "λ_max < SGD's": "" if below is None else f"{below}/{len(seeds)} seeds",
                             "|λ − eigsh|/eigsh": f"{max(agree):.1e}" if agree else "(eigsh only)",
                             "adaptive sharpness": _mean_std(col("sharpness")),
                             "time ×SGD (trainer)": _mean_std(col("relative_time")),
                             "extra state": f"{per_seed[0][method]['state_bytes']:,} B",
                             "peak RSS Δ": _mean_std([v / 2 ** 20 if v is not None else None
                                                      for v in col("peak_memory_bytes")]) + " MiB"}))
    print_table("Sharpness-aware training on MNIST-1D (mean ± std over seeds; 'median time' "
                "column = mean over seeds of the trainer's time per step in the active epochs)",
                rows, reference="none")


# ----------------------------------------------------------------------------- part 2
class PlainSAM:
    """The textbook two-pass SAM step in plain torch (Foret et al. 2021, Algorithm 1)."""

    def __init__(self, model: nn.Module, rho: float, lr: float, momentum: float) -> None:
        self.model, self.rho = model, rho
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def step(self, x, y, indices, epoch):
        params = [p for p in self.model.parameters()]
        self.optimizer.zero_grad()
        outputs = self.model(x)
        loss = nn.functional.cross_entropy(outputs, y)
        loss.backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
            eps = [self.rho * p.grad / (norm + 1e-12) for p in params]
            for p, e in zip(params, eps):
                p.add_(e)
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        self.optimizer.step()
        return loss.detach(), outputs.detach()


def _unfused_cross_entropy(outputs, targets):
    """Cross-entropy as an opaque callable: SAF cannot fuse it and takes its second-root path."""
    return nn.functional.cross_entropy(outputs, targets)


def _gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def interleaved_timing(name: str, data, epochs: int, batch: int, seed: int = 1,
                       chunk: int = 8) -> tuple[dict, list]:
    """Median seconds per step of each rule over the epochs where every penalty is on (SAF's
    ``first_active_epoch``, 7 by default, and MESA's). The methods take turns every
    ``chunk`` batches (same batches, rotating order; each method still sees every batch of
    every epoch in order), so drifts of the machine's load hit all of them alike while
    each model stays warm in cache during its own run of steps, as in real training; only
    full batches are timed. Also ridgeline SAM's distance to the plain-torch SAM after
    some steps."""
    _load_method_plugins()
    # with one torch thread, the CPU time of this thread is the work a step does, whatever
    # the other processes on the machine are doing; with more threads, wall time
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    inputs, targets = data.inputs, data.targets
    n = len(data)
    base = build(name, seed)
    rules = {}
    for method in METHODS:
        model = copy.deepcopy(base).train()
        ctx = MethodContext(model=model, loss_fn=nn.functional.cross_entropy, lr=0.05,
                            momentum=0.9, weight_decay=0.0, epochs=epochs, num_examples=n,
                            num_outputs=10, steps_per_epoch=math.ceil(n / batch), seed=seed)
        rules[method] = TRAINING_METHODS[method](ctx)
    rules["plain SAM"] = PlainSAM(copy.deepcopy(base).train(), 0.05, 0.05, 0.9)
    # SAF's other path, taken by any loss but class-index cross-entropy: torch's
    # cross-entropy node plus the term's closed-form gradient as a second backward root
    model = copy.deepcopy(base).train()
    ctx = MethodContext(model=model, loss_fn=_unfused_cross_entropy, lr=0.05, momentum=0.9,
                        weight_decay=0.0, epochs=epochs, num_examples=n, num_outputs=10,
                        steps_per_epoch=math.ceil(n / batch), seed=seed)
    rules["saf, 2 roots"] = TRAINING_METHODS["saf"](ctx)
    active_from = max(rules["saf"].trajectory.first_active_epoch, rules["mesa"].teacher.first_active_epoch)
    if active_from > epochs:
        raise SystemExit(f"--timing-epochs {epochs} ends before every penalty is on (epoch "
                         f"{active_from}); give more epochs.")
    times: dict[str, dict[int, list[float]]] = {k: {} for k in rules}
    gaps: dict[int, list] = {}
    order_gen = torch.Generator().manual_seed(seed)
    names = list(rules)
    steps = 0
    round_id = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=order_gen)
        batches = [order[start:start + batch] for start in range(0, n, batch)]
        for first in range(0, len(batches), chunk):
            round_id += 1
            shift = round_id % len(names)  # rotate which method goes first
            for method in names[shift:] + names[:shift]:
                rule = rules[method]
                for step, idx in enumerate(batches[first:first + chunk], first + 1):
                    x, y = inputs[idx], targets[idx]
                    began = clock()
                    rule.step(x, y, idx, epoch)
                    if epoch >= active_from and idx.shape[0] == batch:
                        times[method].setdefault(round_id, []).append(clock() - began)
                    if epoch == 1 and method in ("sam", "plain SAM") and step in (1, 10):
                        gaps.setdefault(step, []).append([p.detach().clone() for p in rule.model.parameters()])
        steps += len(batches)
    agreement = [(step, max(float((a - b).abs().max()) for a, b in zip(*pair)))
                 for step, pair in gaps.items()]
    agreement.append((steps, _gap(rules["sam"].model, rules["plain SAM"].model)))
    # per round (`chunk` consecutive batches, which every method runs in turn): each
    # method's median step; the ratio to SGD's median in the same round pairs blocks run
    # a fraction of a second apart, and the median over rounds drops rounds that a load
    # spike hit
    block = {k: {e: statistics.median(v) for e, v in rounds.items()} for k, rounds in times.items()}
    summary = {k: (statistics.median(b.values()),
                   statistics.median(b[e] / block["sgd"][e] for e in b)) for k, b in block.items()}
    return summary, agreement


def timing_table(models, data, epochs, batches, chunk: int = 8) -> None:
    rows = []
    for name in models:
        for batch in batches:
            medians, gaps = interleaved_timing(name, data, epochs, batch, chunk=chunk)
            agreement = ", ".join(f"{g:.0e} after {s}" for s, g in gaps)
            for method, (median, ratio) in medians.items():
                rows.append(Row(f"{name}, batch {batch}", method, median,
                                f"max|Δθ| vs ridgeline SAM: {agreement}" if method == "plain SAM" else "",
                                {"×SGD": f"{ratio:.3f}"}))
    clock = "thread CPU time" if torch.get_num_threads() == 1 else "wall time"
    print_table(f"Time per step ({clock}), methods interleaved every {chunk} batches ({epochs} epochs, "
                f"timed from epoch 7, where SAF and MESA are on, {torch.get_num_threads()} thread(s)): 'median time' is the median over "
                "rounds of each round's median step; '×SGD' the median over rounds of the ratio to "
                "SGD's median step in the same round. Float32 rounding differences between the two "
                "SAMs grow chaotically over many steps.", rows, reference="none")


# ----------------------------------------------------------------------------- part 3
def memory_table() -> None:
    from rich.table import Table

    table = Table(title="SAF memory: (lag+1) epochs of N × O logits (TrajectoryLoss.memory_bytes; "
                        "nothing is allocated here)")
    for column in ("data", "lag", "dtype", "bytes", "MiB"):
        table.add_column(column)
    for label, n, o, lag, dtype in (("MNIST-1D (4000 × 10)", 4000, 10, 3, torch.float16),
                                    ("MNIST-1D (4000 × 10)", 4000, 10, 3, torch.float32),
                                    ("CIFAR-10 (50k × 10)", 50_000, 10, 3, torch.float16),
                                    ("ImageNet-1k (1.28M × 1000)", 1_281_167, 1000, 3, torch.float16)):
        saf = TrajectoryLoss(n, o, lag=lag, dtype=dtype)  # the buffer is allocated on first use
        table.add_row(label, str(lag), str(dtype).replace("torch.", ""), f"{saf.memory_bytes:,}",
                      f"{saf.memory_bytes / 2 ** 20:,.1f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sharpness_aware")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn1d"], choices=list(BUILDERS))
    parser.add_argument("--timing-epochs", type=int, default=20,
                        help="epochs of the interleaved timing (timed from the epoch where SAF's "
                             "and MESA's terms are on, 7 by default)")
    parser.add_argument("--timing-chunk", type=int, default=8,
                        help="batches each method runs before the next one takes its turn")
    parser.add_argument("--timing-batches", type=int, nargs="+", default=[128, 512],
                        help="batch sizes for the interleaved timing (SAF's overhead is a fixed "
                             "cost per step, so its ratio falls as steps get longer)")
    parser.add_argument("--probe", type=int, default=1000, help="examples for λ_max and sharpness")
    parser.add_argument("--parts", nargs="+", default=["science", "timing", "memory"],
                        choices=["science", "timing", "memory"], help="which parts to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 gives steadier timings on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = (mnist1d("train"), mnist1d("test"))
    if "science" in args.parts:
        console.print(f"part 1: {len(args.models)} models × {len(args.seeds)} seeds × "
                      f"{len(METHODS)} methods, {args.epochs} epochs each")
        results = science(args.models, args.seeds, args.epochs, data, args.probe)
        science_table(results, args.models, args.seeds)
    if "timing" in args.parts:
        console.print("part 2: interleaved timing")
        timing_table(args.models, data[0], args.timing_epochs, args.timing_batches,
                     args.timing_chunk)
    if "memory" in args.parts:
        memory_table()


if __name__ == "__main__":
    main()
