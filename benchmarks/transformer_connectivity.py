"""Connectivity of two ridgeline transformers on MNIST-1D: naive vs aligned barriers,
layer-wise (attention vs MLP blocks), and weight-matching time per parameter vs an MLP.

Two ``ridgeline.models.transformer(40, 10, width=W, depth=2, heads=4)`` are trained from
different seeds (init and data order) with Adam; the test-set loss barrier of the linear
path is measured naively, after weight matching and after activation matching (heads
matched as wholes, then within each head). Layer-wise barriers (only one block's
attention or MLP moves from A to B) are measured for the naive and the weight-matched
pair. Weight matching of the pair is timed and divided by the parameter count, next to an
MLP 40-W'-W'-10 of similar size.

``--kv-heads G`` trains and aligns a pair of grouped-query transformers instead
(``transformer(..., heads=4, kv_heads=G)``: G key/value heads, each shared by 4/G query
heads), trained exactly as the multi-head pair; alignment then also permutes the groups,
the query heads within each group and the features within each head.

Run: ``python -m benchmarks transformer_connectivity [--width 64] [--epochs 20] [--seeds 3 4]
[--kv-heads 2]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ridgeline
from ridgeline.connectivity import align, interpolate, layerwise_barriers
from ridgeline.data import mnist1d
from ridgeline.models import mlp, transformer


def _train(factory, init_seed: int, order_seed: int, epochs: int, data, lr: float):
    torch.manual_seed(init_seed)
    model = factory()
    ridgeline.train(model, data, optimizer="adam", lr=lr, epochs=epochs, batch_size=128,
                    seed=order_seed, progress=False)
    return model.eval()


def _groups(model) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            kind = "attention" if parts[2] in ("attn", "norm1") else "mlp"
            groups.setdefault(f"block{parts[1]}.{kind}", []).append(name)
    return groups


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2),
                        help="init (= data order) seeds of the two transformers")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads (grouped-query attention; must divide the 4 "
                             "heads); default: 4, plain multi-head attention")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = mnist1d("train"), mnist1d("test")

    def factory():
        return transformer(40, 10, width=args.width, depth=2, heads=4, kv_heads=args.kv_heads)

    s_a, s_b = args.seeds
    a = _train(factory, s_a, s_a, args.epochs, train, 3e-3)
    b = _train(factory, s_b, s_b, args.epochs, train, 3e-3)
    out: dict = {"width": args.width, "epochs": args.epochs, "seeds": list(args.seeds),
                 "heads": 4, "kv_heads": args.kv_heads or 4,
                 "parameters": sum(p.numel() for p in a.parameters())}

    def path(model_b):
        r = interpolate(a, model_b, test, points=args.points)
        return {"barrier": r.barrier, "error_barrier": r.error_barrier,
                "end_losses": [r.losses[0], r.losses[-1]]}

    out["naive"] = path(b)
    began = time.perf_counter()
    wm = align(a, b, example_input=test.inputs[:64])
    wm_seconds = time.perf_counter() - began
    out["weights"] = {**path(wm.model), "seconds": wm_seconds,
                      "function_relative_error": wm.function_relative_error,
                      "iterations": wm.iterations}
    out["weights"]["objective"] = wm.objective_trace[-1]
    began = time.perf_counter()
    single = align(a, b, example_input=test.inputs[:64], restarts=1)
    single_seconds = time.perf_counter() - began
    out["weights_single_run"] = {**path(single.model), "objective": single.objective_trace[-1],
                                 "seconds": single_seconds}
    am = align(a, b, method="activations", data=train)
    out["activations"] = {**path(am.model),
                          "function_relative_error": am.function_relative_error}
    groups = _groups(a)
    for tag, model_b in (("layerwise_naive", b), ("layerwise_weights", wm.model),
                         ("layerwise_activations", am.model)):
        lw = layerwise_barriers(a, model_b, test, layers=groups, points=args.points,
                                metrics=("loss",))
        out[tag] = dict(zip(lw.layers, lw.barriers))
    # weight matching time per parameter: the transformer vs an MLP of similar size
    hidden = 2 * args.width + 16
    m_a = _train(lambda: mlp(40, [hidden, hidden], 10), 1, 1, 2, train, 3e-3)
    m_b = _train(lambda: mlp(40, [hidden, hidden], 10), 2, 2, 2, train, 3e-3)
    began = time.perf_counter()
    mm = align(m_a, m_b)
    mlp_seconds = time.perf_counter() - began
    n_mlp = sum(p.numel() for p in m_a.parameters())
    out["timing"] = {"transformer_us_per_parameter": 1e6 * wm_seconds / out["parameters"],
                     "transformer_single_run_us_per_parameter":
                         1e6 * single_seconds / out["parameters"],
                     "transformer_passes": wm.iterations,
                     "mlp_parameters": n_mlp, "mlp_seconds": mlp_seconds,
                     "mlp_passes": mm.iterations,
                     "mlp_us_per_parameter": 1e6 * mlp_seconds / n_mlp}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
