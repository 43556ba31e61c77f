"""Merging fine-tunes of one base on MNIST-1D: Fisher vs uniform averaging, and the merge
planner's ranking of 14 candidate merges.

A 40-256-256-10 ReLU MLP (the base) is trained on all 4000 training examples for 8 epochs
(SGD, lr 0.05, momentum 0.9, batch 128). Three copies are fine-tuned for 10 epochs (SGD, lr
0.02) on different subsets: classes {0,1,2,3}, {3,4,5,6}, {6,7,8,9} (each copy sees only
its classes). Reported, on the 1000 test examples (all ten classes):

(3) each fine-tune, the base, and the merges: uniform average, Fisher-weighted averages
    (exact and empirical Fisher, each model's Fisher on its own subset, 500 examples),
    task arithmetic, TIES, DARE.
(4) the planner (ridgeline.merge.predict_merge) over the 14 candidate merges of (3):
    predicted vs measured training loss (1000 training examples), Spearman and Kendall rank correlations, regret of the predicted
    best. Then the same on two models from different seeds (6 candidates), where the
    merges sit far from the models.

Run: ``PYTHONPATH=src .venv/bin/python docs/examples/merging_finetunes.py`` (1 thread,
a few minutes on a shared 2-core machine).
"""

from __future__ import annotations

import copy
import time

import torch

import ridgeline
from ridgeline.data import Dataset, mnist1d
from ridgeline.merge import merge, predict_merge
from ridgeline.models import mlp

torch.set_num_threads(1)

CANDIDATES = [
    {"method": "average"},
    {"method": "fisher", "fisher": "exact"},
    {"method": "fisher", "fisher": "empirical"},
    {"method": "average", "weights": [0.5, 0.25, 0.25]},
    {"method": "task_arithmetic", "scale": 0.3},
    {"method": "task_arithmetic", "scale": 0.5},
    {"method": "task_arithmetic", "scale": 0.7},
    {"method": "task_arithmetic", "scale": 1.0},
    {"method": "ties", "density": 0.1, "scale": 0.5},
    {"method": "ties", "density": 0.2, "scale": 1.0},
    {"method": "ties", "density": 0.5, "scale": 0.7},
    {"method": "dare", "density": 0.3, "scale": 0.5},
    {"method": "dare", "density": 0.5, "scale": 0.7},
    {"method": "dare", "density": 0.3, "scale": 1.0},
]


def fit(model, data, *, epochs, lr, seed):
    ridgeline.train(model, data, optimizer="sgd", lr=lr, momentum=0.9, epochs=epochs,
                    batch_size=128, seed=seed, progress=False)
    return model.eval()


def classes(data: Dataset, chosen) -> Dataset:
    keep = torch.isin(data.targets, torch.tensor(chosen))
    return Dataset(data.inputs[keep], data.targets[keep], 10, f"classes {chosen}")


def acc(model, data) -> float:
    return ridgeline.Objective(model, data).loss_and_accuracy()[1]


def main() -> None:
    began = time.perf_counter()
    train, test = mnist1d("train"), mnist1d("test")
    torch.manual_seed(0)
    base = fit(mlp(40, [256, 256], 10), train, epochs=8, lr=0.05, seed=0)
    subsets = [classes(train, c) for c in ([0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9])]
    tuned = [fit(copy.deepcopy(base), s, epochs=10, lr=0.02, seed=i + 1)
             for i, s in enumerate(subsets)]
    fisher_data = [s.subset(500) for s in subsets]
    print(f"(3) base test acc {acc(base, test):.4f}; fine-tunes "
          + ", ".join(f"{acc(m, test):.4f}" for m in tuned)
          + f" (mean {sum(acc(m, test) for m in tuned) / 3:.4f})")
    for options in CANDIDATES:
        result = merge(tuned, base=base, data=fisher_data, seed=0, **options)
        print(f"    {options}: test acc {acc(result.model, test):.4f} ({result.seconds:.1f} s)")

    moved = merge(tuned, base=base, align="weights").details["units_moved"]
    print(f"    weight matching each fine-tune to the base moves {moved} units (fine-tunes of "
          "one base share its permutation frame)")
    plan = predict_merge(tuned, train.subset(1000), base=base, merge_data=fisher_data,
                         eval_data=test, candidates=CANDIDATES)
    print(f"(4) planner over {len(plan.candidates)} candidates (fine-tunes of one base): "
          f"Spearman {plan.spearman:.3f} (p = {plan.spearman_pvalue:.1e}), Kendall "
          f"{plan.kendall:.3f}; predicted best {plan.best_predicted!r}, measured best "
          f"{plan.best_measured!r}, regret {plan.regret:.4f}")
    for c in plan.candidates:
        print(f"    {c.label:55s} predicted {c.predicted:8.4f} measured {c.measured:8.4f} "
              f"test acc {c.eval_accuracy:.4f}")

    a = fit(mlp(40, [256, 256], 10), train, epochs=15, lr=0.05, seed=11)
    torch.manual_seed(12)
    b = fit(mlp(40, [256, 256], 10), train, epochs=15, lr=0.05, seed=12)
    pair = predict_merge([a, b], train.subset(1000), methods=["average", "fisher"],
                         align=[None, "weights", "activations"], eval_data=test,
                         merge_data=train.subset(500))
    print(f"    two seeds, 6 candidates: Spearman {pair.spearman:.3f}, Kendall "
          f"{pair.kendall:.3f}; predicted best {pair.best_predicted!r}, measured best "
          f"{pair.best_measured!r}")
    for c in pair.candidates:
        print(f"    {c.label:55s} predicted {c.predicted:8.4f} measured {c.measured:8.4f} "
              f"test acc {c.eval_accuracy:.4f}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
