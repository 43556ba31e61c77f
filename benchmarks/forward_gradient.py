"""Forward gradients on MNIST-1D: jvp speed and agreement, guess quality, training, step time.

1. Directional derivatives ∇L·v_k of the full-training-set loss: ridgeline (vmap over
   ``torch.func.jvp``) vs plain PyTorch forward-mode AD (``torch.autograd.forward_ad`` dual
   numbers, one guess at a time) vs backprop (∇L, then dot products); agreement checked.
   No library of forward-gradient estimators is on PyPI, so plain PyTorch is the peer.
2. cos(ĝ, g) of random, Rademacher and local guesses on the MLP at init and trained,
   next to 1/√P (the claim: random ≈ 1/√P, local ≥ 10× higher).
3. Training from one initialisation with backprop, local-guess and random-guess forward
   gradients (test accuracy, gap to backprop).
4. Time per training step, forward-gradient vs backprop, median over interleaved repeats.

Run ``python -m benchmarks forward_gradient [--epochs 30] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch.nn import functional as F

from benchmarks.harness import Row, console, print_table, timeit
from ridgeline import Objective, train
from ridgeline.data import mnist1d
from ridgeline.errors import NonFiniteLossError
from ridgeline.gradients import ForwardGradientSGD, forward_gradient, quality
from ridgeline.models import mlp
from ridgeline.train import BackpropStep


def dual_number_derivatives(model, x, y, tangents: list[dict]) -> torch.Tensor:
    """The textbook loop: one forward pass with dual parameters per guess."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    params = {k: v.detach() for k, v in model.named_parameters()}
    out = []
    with torch.no_grad():
        for tangent in tangents:
            with fwAD.dual_level():
                duals = {k: fwAD.make_dual(params[k], tangent[k]) for k in params}
                loss = F.cross_entropy(functional_call(model, duals, (x,)), y)
                out.append(fwAD.unpack_dual(loss).tangent)
    return torch.stack(out)


def backprop_derivatives(model, x, y, tangents: list[dict]) -> torch.Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    names = [n for n, _ in model.named_parameters()]
    return torch.stack([sum((g * t[n]).sum() for n, g in zip(names, grads)) for t in tangents])


def jvp_section(model, data, repeats: int) -> list[Row]:
    x, y = data.inputs, data.targets
    objective = Objective(model, (x, y))
    rows = []
    for k in (1, 8):
        case = f"{k} directional derivative(s), N={len(x)}"
        t_ours, fg = timeit(lambda k=k: forward_gradient(objective, num_guesses=k, seed=0),
                            repeats=repeats)
        tangents = [{n: fg.guesses[n][i] for n in fg.guesses} for i in range(k)]
        t_dual, d_dual = timeit(lambda t=tangents: dual_number_derivatives(model, x, y, t),
                                repeats=repeats)
        t_bp, d_bp = timeit(lambda t=tangents: backprop_derivatives(model, x, y, t), repeats=repeats)
        ours = fg.directional_derivatives[0]
        scale = float(d_bp.abs().max())
        rows.append(Row(case, "ridgeline", t_ours,
                        f"max |Δd|/max|d| vs backprop {float((ours - d_bp).abs().max()) / scale:.1e}"))
        rows.append(Row(case, "torch forward_ad loop", t_dual,
                        f"{float((d_dual - d_bp).abs().max()) / scale:.1e}"))
        rows.append(Row(case, "backprop ∇L then dot", t_bp, "reference"))
    return rows


def quality_section(models: dict, data, repeats: int) -> list[dict]:
    rows = []
    for state, model in models.items():
        for guess in ("random", "rademacher", "local"):
            q = quality(model, data, guess=guess, repeats=repeats, seed=0, fit_epochs=5)
            rows.append({"state": state, "guess": guess, "P": q.num_params, "mean cos": q.mean,
                         "std": q.std, "1/√P": q.random_baseline, "E[cos] random": q.expected_random,
                         "× 1/√P": q.mean / q.random_baseline,
                         "per layer": {k: round(float(v.mean()), 4) for k, v in q.per_layer.items()},
                         "head FLOPs": (f"{100 * q.details['flops']['ratio']:.1f} %"
                                        if "flops" in q.details else "")})
    return rows


def training_section(initial, train_data, test_data, epochs: int) -> list[dict]:
    num_params = sum(p.numel() for p in initial.parameters())
    methods = [("backprop", {}, 0.05),
               ("forward, local guess", {"gradient": "forward", "guess": "local"}, 0.05),
               ("forward, random guess", {"gradient": "forward", "guess": "random"},
                0.05 / math.sqrt(num_params)),
               ("forward, random guess, 3× lr", {"gradient": "forward", "guess": "random"},
                0.15 / math.sqrt(num_params))]
    rows = []
    for label, extra, lr in methods:
        model = copy.deepcopy(initial)
        try:
            result = train(model, train_data, optimizer="sgd", lr=lr, momentum=0.9, epochs=epochs,
                           batch_size=128, seed=1, eval_data=test_data, progress=False, **extra)
        except NonFiniteLossError:
            rows.append({"method": label, "lr": lr, "train loss": math.nan, "test acc": math.nan,
                         "ms/step (in training)": math.nan})
            continue
        rows.append({"method": label, "lr": lr, "train loss": result.final["train_loss"],
                     "test acc": result.final["eval_accuracy"],
                     "ms/step (in training)": 1000 * result.time_per_step})
    best = rows[0]["test acc"]
    for row in rows:
        row["gap to backprop"] = best - row["test acc"]
    return rows


def step_time_section(initial, data, repeats: int) -> list[Row]:
    x, y = data.inputs[:128], data.targets[:128]
    rules = {"backprop (SGD)": lambda m: BackpropStep(m, torch.optim.SGD(m.parameters(), lr=1e-4),
                                                      F.cross_entropy),
             "forward, random K=1": lambda m: ForwardGradientSGD(m, lr=1e-4, guess="random"),
             "forward, random K=8 span": lambda m: ForwardGradientSGD(
                 m, lr=1e-4, guess="random", num_guesses=8, combine="span"),
             "forward, local (3 blocks)": lambda m: ForwardGradientSGD(m, lr=1e-4, guess="local")}
    built = {name: make(copy.deepcopy(initial).train()) for name, make in rules.items()}
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(3):  # interleave so that load from other processes hits every rule alike
        for name, rule in built.items():
            t, _ = timeit(lambda rule=rule: rule.step(x, y, None, 1), repeats=repeats, warmup=3)
            times[name].append(t)
    base = sorted(times["backprop (SGD)"])[1]
    rows = []
    for name, values in times.items():
        median = sorted(values)[1]
        rows.append(Row("one step, batch 128", name, median, f"{median / base:.2f}× backprop"))
    return rows


def _table(title: str, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks forward_gradient")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (study: 30)")
    parser.add_argument("--repeats", type=int, default=20, help="random estimates per cosine")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, test_data = mnist1d("train"), mnist1d("test")
    torch.manual_seed(1)
    initial = mlp(40, [256, 256], 10)
    trained = copy.deepcopy(initial)
    train(trained, train_data, optimizer="sgd", lr=0.05, momentum=0.9, epochs=args.epochs,
          batch_size=128, seed=1, progress=False)
    print_table("Directional derivatives of the MNIST-1D loss (MLP 40-256-256-10)",
                jvp_section(trained, train_data, repeats=3))
    _table("cos(ĝ, g) per guess (MNIST-1D train set, full-batch gradient)",
           quality_section({"init": initial, "trained": trained}, train_data, args.repeats))
    _table(f"Training from one initialisation ({args.epochs} epochs, SGD momentum 0.9, batch 128)",
           training_section(initial, train_data, test_data, args.epochs))
    print_table("Time per training step (median of 3 interleaved rounds)",
                step_time_section(initial, train_data, repeats=20), reference="backprop (SGD)")


if __name__ == "__main__":
    main()
