"""Objective.grad (size-weighted batches via torch.func) vs plain autograd over a DataLoader."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.harness import Row, print_table, timeit
from ridgeline import Objective
from ridgeline.data import mnist1d
from ridgeline.models import mlp


def plain_autograd_grad(model: nn.Module, inputs, targets, batch_size: int) -> list[torch.Tensor]:
    """The usual loop: sum of per-batch mean losses weighted by batch size, then backward."""
    model.zero_grad(set_to_none=True)
    n = inputs.shape[0]
    for start in range(0, n, batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        loss = nn.functional.cross_entropy(model(x), y) * (x.shape[0] / n)
        loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks objective")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    data = mnist1d("train")
    rows = []
    for widths, batch_size in (([256, 256], 4000), ([256, 256], 500), ([1024, 1024], 1000)):
        torch.manual_seed(0)
        model = mlp(40, widths, 10).eval()
        objective = Objective(model, data, batch_size=batch_size)
        case = f"mlp {widths}, N=4000, batch {batch_size}"
        t_ours, g_ours = timeit(objective.grad, repeats=args.repeats)
        t_plain, g_plain = timeit(lambda m=model, b=batch_size: plain_autograd_grad(
            m, data.inputs, data.targets, b), repeats=args.repeats)
        err = max(float((a - b).abs().max()) for a, b in zip(g_ours.values(), g_plain))
        rows.append(Row(case, "ridgeline", t_ours, f"max |Δg| {err:.1e}"))
        rows.append(Row(case, "plain autograd", t_plain, ""))
    print_table("Objective.grad vs plain autograd (full-dataset gradient)", rows)


if __name__ == "__main__":
    main()
