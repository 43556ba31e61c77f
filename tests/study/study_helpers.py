"""A tiny study (one 4-8-3 MLP on 120 Gaussian-mixture points, 1 epoch) and a measurement
``weights_sum`` that reads trained checkpoints, for the run-folder tests."""

from __future__ import annotations

import os
import time

from ridgeline.study.registry import Options, register_measurement

CALLS: list[str] = []


class WeightsSumOptions(Options):
    models: list[str] = ["a"]
    label: str = "x"


@register_measurement("weights_sum", options=WeightsSumOptions)
def _weights_sum(ctx, options: WeightsSumOptions) -> dict:
    CALLS.append(options.label)
    if options.label == "boom":
        raise RuntimeError("simulated failure")
    if options.label == "hang" and os.environ.get("RIDGELINE_TEST_HANG"):
        print("hanging", flush=True)  # the test kills this process now
        time.sleep(120)
    return {name: float(sum(p.detach().sum() for p in ctx.model(name).parameters()))
            for name in options.models}


def tiny(**extra) -> dict:
    config = {
        "name": "tiny",
        "data": {"name": "gaussian_mixture",
                 "args": {"num_samples": 120, "dim": 4, "num_classes": 3}},
        "training": {"epochs": 1, "batch_size": 32},
        "models": [{"name": "a", "factory": "mlp",
                    "args": {"in_features": 4, "widths": [8], "out_features": 3}},
                   {"name": "b", "factory": "mlp", "init_seed": 1,
                    "args": {"in_features": 4, "widths": [8], "out_features": 3}}],
        "measurements": [{"kind": "weights_sum", "id": "uses-a", "label": "a"},
                         {"kind": "weights_sum", "id": "uses-b", "models": ["b"], "label": "b"}],
    }
    config.update(extra)
    return config
