"""Merging: ridgeline.merge (MergeMany by weight matching) vs rebasin's MergeMany.

Three MNIST-1D MLPs (40-W-W-10, SGD lr 0.05, momentum 0.9, batch 128) from different
seeds are merged into one by permutation alignment and averaging. Both libraries get the
same three trained models (rebasin edits its inputs, so it gets copies) and both merged
models are scored by the same evaluator (test loss and accuracy on MNIST-1D's 1000 test
examples). Each merge runs ``--repeats`` times with seeds 0, 1, … (weight matching and
MergeMany visit permutations in a seeded random order and end in different local optima);
reported: the median wall time (the runs interleaved round robin, so that the load of a
shared machine falls on every configuration alike) and the merged models' mean test
accuracy (and its range), next to the naive (unaligned) average and the endpoints' mean.
ridgeline runs with its default weight matching on the weight matrices
(``matching="matrices"``; rebasin's cost also leaves biases out), with Git Re-Basin's full
objective (``matching="all"``, biases included), with ``depth_weight=2`` (the layer
weights rebasin's cost effectively has), and with REPAIR and activation matching (both
use training data; rebasin's MergeMany does not). Goal: equal or better accuracy, ≥ 2×
faster.

Run: ``python -m benchmarks merge [--width 512] [--epochs 20] [--models 3] [--threads 1]
[--first-seed 1]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

import ridgeline
from benchmarks.harness import Row, Skip, peer_available, print_table
from ridgeline.data import mnist1d
from ridgeline.merge import merge
from ridgeline.models import mlp


def _train(width: int, seed: int, epochs: int, data) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mlp(40, [width, width], 10)
    ridgeline.train(model, data, optimizer="sgd", lr=0.05, momentum=0.9, epochs=epochs,
                    batch_size=128, seed=seed, progress=False)
    return model.eval()


def _rebasin_merge_many(models, inputs):
    if not peer_available("rebasin"):
        raise Skip("rebasin is not installed (pip install --no-deps rebasin==0.0.47 torchview "
                   "graphviz)")
    from rebasin import MergeMany

    copies = [copy.deepcopy(m) for m in models]  # MergeMany edits the models it is given
    return MergeMany(copies, copy.deepcopy(models[0]), inputs[:8]).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks merge")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1,
                        help="the models are trained with seeds first-seed, first-seed + 1, …")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 gives stable timings on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = mnist1d("train"), mnist1d("test")
    began = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.models)
    models = [_train(args.width, seed, args.epochs, train) for seed in seeds]
    print(f"trained {args.models} 40-{args.width}-{args.width}-10 MLPs (seeds {list(seeds)}) "
          f"for {args.epochs} "
          f"epochs in {time.perf_counter() - began:.0f} s ({args.threads} thread(s))")

    def score(model) -> tuple[float, float]:
        return ridgeline.Objective(model, test).loss_and_accuracy()

    ends = [score(m) for m in models]
    mean_acc = sum(a for _, a in ends) / len(ends)
    print("  endpoints' test accuracy: " + ", ".join(f"{a:.4f}" for _, a in ends)
          + f" (mean {mean_acc:.4f})")
    naive_loss, naive_acc = score(merge(models).model)
    case = f"MergeMany, {args.models} × 40-{args.width}-{args.width}-10"

    def extra(scores) -> dict:
        accs = [a for _, a in scores]
        mean = sum(accs) / len(accs)
        return {"test acc over seeds": f"{min(accs):.4f}–{max(accs):.4f}",
                "test loss (mean)": f"{sum(v for v, _ in scores) / len(scores):.4f}",
                "% of endpoints' mean": f"{100 * mean / mean_acc:.1f}"}

    configs: list[tuple[str, Any]] = [
        (label, lambda seed, kw=kwargs: merge(models, seed=seed, **kw))
        for label, kwargs in (
            ("ridgeline", {"align": "weights"}),
            ("ridgeline, matching='all' (biases too)", {"align": "weights", "matching": "all"}),
            ("ridgeline, matrices, depth_weight=2 (rebasin's cost)",
             {"align": "weights", "depth_weight": 2.0}),
            ("ridgeline + REPAIR", {"align": "weights", "repair": True, "data": train}),
            ("ridgeline, activations", {"align": "activations", "data": train}))]
    rows = []
    try:
        _rebasin_merge_many(models[:2], train.inputs)  # fails fast when rebasin is missing
        configs.append(("rebasin", lambda seed: _rebasin_merge_many(models, train.inputs)))
    except Skip as exc:
        rows.append(Row(case, "rebasin", None, str(exc)))
    # round robin: seed 0 of every configuration, then seed 1, …, so that the load of a
    # shared machine falls on all of them alike. The alignment is a local optimum that
    # depends on the seed (rebasin draws its order from torch's generator).
    times: dict[str, list[float]] = {label: [] for label, _ in configs}
    scores: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in configs}
    last: dict[str, Any] = {}
    for seed in range(args.repeats):
        for label, make in configs:
            torch.manual_seed(seed)
            began = time.perf_counter()
            out = make(seed)
            times[label].append(time.perf_counter() - began)
            last[label] = out
            scores[label].append(score(out if isinstance(out, torch.nn.Module) else out.model))
    for label, _ in configs:
        accs = [a for _, a in scores[label]]
        details = getattr(last[label], "details", None)
        rows.append(Row(case, label, statistics.median(times[label]),
                        f"test acc {sum(accs) / len(accs):.4f}",
                        {**extra(scores[label]),
                         "times": " ".join(f"{t:.1f}" for t in times[label]),
                         **({"rounds": details.get("merge_many_rounds")} if details else {})}))
    rows.append(Row("naive average (no alignment)", "ridgeline", None,
                    f"test acc {naive_acc:.4f}", {"test loss (mean)": f"{naive_loss:.4f}",
                                                   "% of endpoints' mean":
                                                   f"{100 * naive_acc / mean_acc:.1f}"}))
    print_table("model merging (median wall time; same evaluator for both)", rows)


if __name__ == "__main__":
    main()
