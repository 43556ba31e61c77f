"""Measurement ``forward_gradient``: guess quality, forward-gradient training, time per step.

On a trained model of the study: cos(ĝ, g) per guess type against the backprop gradient
(overall and per layer), compared with 1/√P. From the model's initialisation: learning
curves of backprop, local-guess and random-guess forward-gradient training, and the time
per step of each (Fournier et al. 2023; Baydin et al. 2022).
"""

from __future__ import annotations

import copy
import math

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement


class ForwardGradientOptions(Options):
    model: str = "a"
    guesses: list[str] = ["random", "rademacher", "local"]
    repeats: int = 10
    num_guesses: int = 1
    fit_epochs: int = 3
    head: str = "linear"
    train_epochs: int = 10
    train_guesses: list[str] = ["local", "random"]
    random_lr: float | None = None


def _summary(record: dict) -> dict:
    result = record["result"]
    row: dict = {"model": result["model"], "P": result["num_params"]}
    for name, q in result["quality"].items():
        row[f"cos {name}"] = q["mean"]
    row["1/√P"] = result["random_baseline"]
    runs = result["training"]
    for name, run in runs.items():
        row[f"test acc {name}"] = run["final_test_accuracy"]
    for name, run in runs.items():
        if name != "backprop":
            row[f"time ratio {name}"] = run["time_ratio"]
    return row


def _quality_figure(result: dict) -> str:
    fig, ax = new_figure(7, 3.4)
    names = list(result["quality"])
    layers = list(next(iter(result["quality"].values()))["per_layer"]) if names else []
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        per_layer = result["quality"][name]["per_layer"]
        means = [max(abs(per_layer[k]["mean"]), 1e-6) for k in layers]
        ax.bar([j + i * width for j in range(len(layers))], means, width=width, label=name)
    ax.axhline(result["random_baseline"], color="k", ls=":", label="1/√P")
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(layers))], layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("|cos(ĝ, g)| per layer")
    ax.legend(fontsize=8)
    return figure_html(fig, caption="Alignment of forward-gradient estimates with the backprop "
                                    "gradient, per layer, on the trained model (log scale).")


def _training_figure(result: dict) -> str:
    fig, (ax_loss, ax_acc) = new_figure(9, 3.2, ncols=2)
    for name, run in result["training"].items():
        epochs = [h["epoch"] for h in run["history"]]
        ax_loss.plot(epochs, [h["train_loss"] for h in run["history"]], marker="o", ms=3, label=name)
        ax_acc.plot(epochs, [h.get("eval_accuracy") for h in run["history"]], marker="o", ms=3,
                    label=name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.legend(fontsize=8)
    return figure_html(fig, caption="Training from the same initialisation with backprop and "
                                    "with forward gradients (local and random guesses).")


def _report(record: dict) -> str:
    result = record["result"]
    quality_rows = [{"guess": name, "mean cos": q["mean"], "std": q["std"],
                     "× 1/√P": q["ratio_to_baseline"], "E[cos] one random guess": q["expected_random"],
                     "‖ĝ‖/‖g‖": q["norm_ratio"], "estimates": q["repeats"]}
                    for name, q in result["quality"].items()]
    backprop = result["training"].get("backprop", {})
    train_rows = [{"method": name, "lr": run["lr"],
                   "final test acc": run["final_test_accuracy"],
                   "gap to backprop": (backprop.get("final_test_accuracy", math.nan)
                                       - run["final_test_accuracy"]),
                   "ms/step": 1000 * run["time_per_step"], "time ÷ backprop": run["time_ratio"]}
                   for name, run in result["training"].items()]
    heads = result.get("local_heads")
    note = (f"<p>Model {fmt(result['model'])}, P = {fmt(result['num_params'])} parameters; "
            f"1/√P = {fmt(result['random_baseline'])}. ")
    if heads:
        note += (f"Local heads ({fmt(heads['head'])}) cost {fmt(100 * heads['flops']['ratio'])} % "
                 "of the network's multiply-accumulates. ")
    note += "Step times are wall-clock on this machine and include the forward pass for the outputs.</p>"
    return (note + table_html(quality_rows) + _quality_figure(result)
            + _training_figure(result) + table_html(train_rows))


def _check(config, options: ForwardGradientOptions) -> list[str]:
    from ridgeline.gradients.guesses import GUESS_NAMES

    return [f"{field}: unknown guess {name!r}; the guesses are {list(GUESS_NAMES)}"
            for field in ("guesses", "train_guesses") for name in getattr(options, field)
            if name not in GUESS_NAMES]


@register_measurement("forward_gradient", options=ForwardGradientOptions, report=_report,
                      check=_check,
                      summary=_summary,
                      description="Forward gradients: guess quality, training, time per step.")
def run(ctx, options: ForwardGradientOptions) -> dict:
    """Cosine of forward-gradient estimates per guess type; forward vs backprop training."""
    from ridgeline.gradients import quality
    from ridgeline.train import train

    trained = ctx.model(options.model)
    train_data, test_data = ctx.dataset("train"), ctx.dataset("test")
    results: dict = {"model": options.model, "quality": {}, "training": {}}
    for name in options.guesses:
        q = quality(trained, train_data, guess=name, repeats=options.repeats,
                    num_guesses=options.num_guesses, seed=ctx.seed, fit_epochs=options.fit_epochs)
        results["quality"][name] = q.to_dict()
        results["num_params"], results["random_baseline"] = q.num_params, q.random_baseline
        if name == "local":
            results["local_heads"] = q.details
    settings = ctx.config.training_for(options.model)
    base = settings.optimizer if settings.optimizer in ("sgd", "adam", "adamw") else "sgd"
    initial = ctx.initial_model(options.model)
    num_params = sum(p.numel() for p in initial.parameters())
    results.setdefault("num_params", num_params)
    results.setdefault("random_baseline", 1 / math.sqrt(num_params))
    random_lr = options.random_lr if options.random_lr is not None else settings.lr / math.sqrt(num_params)
    methods = [("backprop", {}, settings.lr)]
    for name in options.train_guesses:
        lr = random_lr if name in ("random", "rademacher") else settings.lr
        extra: dict = {"gradient": "forward", "guess": name}
        if name == "local":
            extra["head"] = options.head
        elif name == "previous":  # the previous estimate plus fresh directions, projected
            extra.update(combine="span", num_guesses=max(2, options.num_guesses))
        else:
            extra["num_guesses"] = options.num_guesses
        methods.append((f"forward-{name}", extra, lr))
    for label, extra, lr in methods:
        model = copy.deepcopy(initial)
        outcome = train(model, train_data, optimizer=base, lr=lr,
                        momentum=settings.momentum, weight_decay=settings.weight_decay,
                        epochs=options.train_epochs, batch_size=settings.batch_size,
                        seed=settings.seed, loss=settings.loss, eval_data=test_data,
                        progress=ctx.progress, **extra)
        results["training"][label] = {
            "lr": lr, "history": outcome.history, "time_per_step": outcome.time_per_step,
            "final_test_accuracy": outcome.final.get("eval_accuracy"), "method": outcome.method}
    base_time = results["training"]["backprop"]["time_per_step"]
    for run_ in results["training"].values():
        run_["time_ratio"] = run_["time_per_step"] / base_time if base_time > 0 else math.nan
    return results
