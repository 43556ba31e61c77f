"""Merging MNIST-1D MLPs trained from different seeds: Git Re-Basin's aligned average, and
the split-data experiment.

(1) Two 40-512-512-10 ReLU MLPs, init/data-order seeds 1 and 2, SGD (lr 0.05, momentum
    0.9, batch 128) for 20 epochs on MNIST-1D (4000 train / 1000 test). Test accuracy of
    each, of their naive average, of the average after weight matching and after
    activation matching (ridgeline.merge.merge, align=...).
(2) Split data: the same architecture, model A trained only on the examples of classes
    0–4, model B only on classes 5–9 (a shared ten-way head: both have all ten outputs,
    each sees five labels), different seeds. Accuracy on all ten classes of each model,
    of the naive and of the aligned averages, and of the best α-weighted aligned average.
Every merge also with REPAIR (repair=True: hidden-unit statistics reset to the mean of the
models' on the training data).

Run: ``PYTHONPATH=src .venv/bin/python docs/examples/merging_rebasin.py`` (1 thread,
about two minutes on a shared 2-core machine).
"""

from __future__ import annotations

import itertools
import time

import torch

import ridgeline
from ridgeline.data import mnist1d
from ridgeline.merge import merge
from ridgeline.models import mlp

torch.set_num_threads(1)


def trained(seed: int, data, width: int = 512, epochs: int = 20) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mlp(40, [width, width], 10)
    ridgeline.train(model, data, optimizer="sgd", lr=0.05, momentum=0.9, epochs=epochs,
                    batch_size=128, seed=seed, progress=False)
    return model.eval()


def accuracy(model, data) -> float:
    return ridgeline.Objective(model, data).loss_and_accuracy()[1]


def main() -> None:
    train, test = mnist1d("train"), mnist1d("test")
    began = time.perf_counter()
    a, b = trained(1, train), trained(2, train)
    ends = [accuracy(m, test) for m in (a, b)]
    mean_end = sum(ends) / 2
    print(f"(1) two seeds, width 512: test accuracy A {ends[0]:.4f}, B {ends[1]:.4f} "
          f"(mean {mean_end:.4f})")
    for align in (None, "weights", "activations"):
        for repair in (False, True):
            result = merge([a, b], align=align, data=train, repair=repair)
            acc = accuracy(result.model, test)
            print(f"    average, align={align!s:12s} repair={repair!s:5s} test acc {acc:.4f} = "
                  f"{100 * acc / mean_end:.1f} % of the endpoints' mean ({result.seconds:.2f} s)")

    low = train.targets < 5
    part_a = ridgeline.data.Dataset(train.inputs[low], train.targets[low], 10, "0-4")
    part_b = ridgeline.data.Dataset(train.inputs[~low], train.targets[~low], 10, "5-9")
    a, b = trained(3, part_a), trained(4, part_b)
    test_low = test.targets < 5
    print("(2) split data (A: classes 0-4, B: classes 5-9, shared ten-way head), width 512:")
    for name, model in (("A", a), ("B", b)):
        print(f"    model {name}: all-class test acc {accuracy(model, test):.4f}")
    for align, repair in itertools.product((None, "weights", "activations"), (False, True)):
        best = None
        for w in (0.3, 0.4, 0.5, 0.6, 0.7):
            merged = merge([a, b], align=align, data=train, weights=[w, 1 - w],
                           repair=repair).model
            acc = accuracy(merged, test)
            if w == 0.5:
                half = acc
                with torch.no_grad():
                    pred = merged(test.inputs).argmax(1)
                low_acc = float((pred[test_low] == test.targets[test_low]).float().mean())
                high_acc = float((pred[~test_low] == test.targets[~test_low]).float().mean())
            best = max(best or (0, 0), (acc, w))
        print(f"    average, align={align!s:12s} repair={repair!s:5s} all-class test acc {half:.4f} (classes 0-4 "
              f"{low_acc:.4f}, 5-9 {high_acc:.4f}); best weight w_A={best[1]}: {best[0]:.4f}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
