"""Measurement ``sharpness_aware``: SGD, SAM, ASAM, SAF and MESA on one model, one budget.

Each method trains a fresh copy of the same model (same initialisation, data order,
learning rate and number of epochs); the comparison reports test accuracy, the top Hessian
eigenvalue and the adaptive worst-case sharpness of the final weights (on a fixed subset of
the training set, eval mode), time per step relative to SGD, and memory.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ridgeline.study.figures import figure_html, fmt, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement

__all__ = ["SharpnessAwareOptions", "compare_methods", "PeakMemory"]

class SharpnessAwareOptions(Options):
    """Options of ``sharpness_aware``.

    model: the study model to train (its architecture, init seed and training settings).
    methods: training methods to compare ("sgd" first, as the reference for time).
    epochs: the common budget (default: the model's training epochs).
    method_options: per-method options, e.g. ``{saf = {lag = 2}, asam = {rho = 0.5}}``.
    subset: training examples used for the eigenvalue and the sharpness.
    sharpness_rho: radius of the adaptive (‖δ ⊘ |θ|‖₂ ≤ ρ) worst-case sharpness.
    tol: relative residual tolerance of the top eigenvalue.
    """

    model: str = "a"
    methods: list[str] = ["sgd", "sam", "asam", "saf", "mesa"]
    epochs: int | None = None
    method_options: dict[str, dict[str, Any]] = {}
    subset: int = 1000
    sharpness_rho: float = 0.5
    tol: float = 1e-3


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak on a GPU, else the
    resident set size (RSS) of this process sampled every ``interval`` seconds (Linux).

    ``kind`` says which; ``peak_bytes`` is None where neither is available. RSS includes
    allocator caching, so it is a coarse upper bound on what the block itself needed.
    """

    def __init__(self, device: torch.device, interval: float = 0.001) -> None:
        self.device, self.interval = torch.device(device), interval
        self.peak_bytes: int | None = None
        self.kind = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = "CUDA allocator peak above start"
            return self
        self._start = self._rss()
        if self._start is not None:
            self.kind = "sampled RSS peak above start"
            self._max = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss()
            if rss is not None and rss > self._max:
                self._max = rss

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = int(max(self._max, self._rss() or 0) - self._start)


def _curvature(model: nn.Module, data, *, rho: float, tol: float, seed: int,
               loss: str) -> tuple[dict, str | None]:
    """Top Hessian eigenvalue and adaptive worst-case sharpness, or Nones with the reason."""
    try:
        from ridgeline.curvature import sharpness, top_eigenvalues
    except ImportError as exc:
        return ({"top_eigenvalue": None, "sharpness": None},
                f"ridgeline.curvature is not available ({exc}); eigenvalue and sharpness skipped.")
    from ridgeline.objective import Objective

    objective = Objective(model, data, loss)
    # k = 2: with k = 1 and a loose tolerance, Lanczos can stop on the second eigenvalue
    # before the first has emerged (seen on MNIST-1D MLPs); the largest of two is robust
    spectrum = top_eigenvalues(objective, k=2, tol=tol, seed=seed, vectors=False)
    worst = sharpness(objective, kind="worst", rho=rho, adaptive=True, norm=2, steps=20, seed=seed)
    return {"top_eigenvalue": float(spectrum.values.max()), "sharpness": float(worst.value)}, None


def _first_active_epoch(described: dict) -> int:
    """The first epoch in which a method's penalty is on, as the trained step rule reports
    it (SAF's and MESA's ``first_active_epoch``; 1 for methods without a delayed term)."""
    return int(described.get("first_active_epoch", 1))


def compare_methods(build: Callable[[], nn.Module], train_data, test_data, *,
                    methods: list[str], epochs: int, lr: float, momentum: float,
                    weight_decay: float = 0.0, batch_size: int = 128, seed: int = 0,
                    loss: str = "cross_entropy", method_options: dict | None = None,
                    subset: int = 1000, sharpness_rho: float = 0.5, tol: float = 1e-3,
                    scheduler: str | None = None, progress: bool = False,
                    on_model: Callable[[str, nn.Module], dict] | None = None) -> dict:
    """Train ``build()`` with every method under one budget and measure the results.

    Time per step is measured over the epochs in which every method's penalty is active
    (from the latest ``first_active_epoch`` the SAF/MESA step rules report), so SAF's and
    MESA's extra work is counted.
    ``on_model(method, trained_model)`` may return extra JSON-safe fields for the method's
    row (benchmarks use it for cross-checks). Returns a JSON-safe dict: ``methods`` (one
    entry per method) and notes.
    """
    from ridgeline.train import train

    method_options = dict(method_options or {})
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    probe = train_data.subset(subset)
    rows: dict[str, dict] = {}
    seconds: dict[str, list[float]] = {}
    notes: list[str] = []
    # warm the allocator and the kernels once, so the first method's memory and time are
    # not charged for one-off start-up costs
    train(build(), train_data.subset(2 * batch_size), optimizer="sgd", lr=lr, epochs=1,
          batch_size=batch_size, seed=seed, loss=loss, eval_data=test_data, progress=False)
    for method in methods:
        model = build()
        device = next(model.parameters()).device
        with PeakMemory(device) as memory:
            result = train(model, train_data, optimizer=method, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, epochs=epochs, batch_size=batch_size,
                           seed=seed, loss=loss, eval_data=test_data, scheduler=scheduler,
                           progress=progress, **method_options.get(method, {}))
        history = result.history
        curvature, note = _curvature(model, probe, rho=sharpness_rho, tol=tol, seed=seed, loss=loss)
        if note and note not in notes:
            notes.append(note)
        rows[method] = {
            "test_accuracy": history[-1].get("eval_accuracy"),
            "test_loss": history[-1].get("eval_loss"),
            "train_loss": history[-1]["train_loss"],
            **curvature,
            "time_per_step_all_epochs": result.time_per_step,
            "state_bytes": int(result.method.get("memory_bytes", 0)),
            "peak_memory_bytes": memory.peak_bytes,
            "memory_kind": memory.kind,
            "method": result.method,
            "history": [{k: h.get(k) for k in ("epoch", "train_loss", "train_accuracy",
                                               "eval_loss", "eval_accuracy")} for h in history],
            **(on_model(method, model) if on_model is not None else {}),
        }
        seconds[method] = [h["seconds"] for h in history]
    timed_from = min(epochs, max([_first_active_epoch(r["method"]) for r in rows.values()] or [1]))
    timed_steps = steps_per_epoch * (epochs - timed_from + 1)
    for method, row in rows.items():
        timed_seconds = seconds[method][-1] - seconds[method][timed_from - 1]
        row["time_per_step"] = timed_seconds / max(timed_steps, 1)
    reference = rows.get("sgd", {}).get("time_per_step")
    for row in rows.values():
        row["relative_time"] = row["time_per_step"] / reference if reference else None
    return {"methods": rows, "epochs": epochs, "timed_from_epoch": timed_from,
            "steps_per_epoch": steps_per_epoch, "curvature_examples": len(probe),
            "sharpness_rho": sharpness_rho, "threads": torch.get_num_threads(), "notes": notes}


# ----------------------------------------------------------------------------- report
_COLUMNS = {"test_accuracy": "test acc", "train_loss": "train loss", "top_eigenvalue": "λ_max",
            "sharpness": "adaptive sharpness", "relative_time": "time ×SGD",
            "state_bytes": "extra state (bytes)", "peak_memory_bytes": "peak memory (bytes)"}


def _table_rows(result: dict) -> list[dict]:
    rows = []
    for method, row in result["methods"].items():
        rows.append({"method": method, **{label: row.get(key) for key, label in _COLUMNS.items()},
                     "ms/step": 1000 * row["time_per_step"]})
    return rows


def _summary(record: dict) -> dict:
    result = record["result"]
    names = list(result["methods"])
    joined = lambda key: " / ".join(fmt(result["methods"][m].get(key), 3) for m in names)  # noqa: E731
    return {"model": record["options"]["model"], "methods": " / ".join(names),
            "test acc": joined("test_accuracy"), "λ_max": joined("top_eigenvalue"),
            "time ×SGD": joined("relative_time")}


def _report(record: dict) -> str:
    result = record["result"]
    fig, (ax_loss, ax_acc) = new_figure(9, 3.2, ncols=2)
    for method, row in result["methods"].items():
        epochs = [h["epoch"] for h in row["history"]]
        ax_loss.plot(epochs, [h["train_loss"] for h in row["history"]], marker="o", ms=2, label=method)
        accuracy = [h.get("eval_accuracy") for h in row["history"]]
        ax_acc.plot(epochs, [math.nan if a is None else a for a in accuracy], marker="o", ms=2,
                    label=method)
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy")
    ax_acc.legend()
    memory_kind = next(iter(result["methods"].values()), {}).get("memory_kind", "none")
    caption = (f"model {record['options']['model']}, {result['epochs']} epochs each. λ_max and "
               f"sharpness (adaptive, ℓ2, ρ = {result['sharpness_rho']}) on "
               f"{result['curvature_examples']} training examples in eval mode; time per step "
               f"over epochs {result['timed_from_epoch']}–{result['epochs']} "
               f"({result['threads']} threads); peak memory: {memory_kind}.")
    notes = "".join(f"<p><em>{n}</em></p>" for n in result.get("notes", []))
    return table_html(_table_rows(result)) + figure_html(fig, caption=caption) + notes


def _check(config, options: SharpnessAwareOptions) -> list[str]:
    import importlib

    training = importlib.import_module("ridgeline.train")
    training._load_method_plugins()
    known = training.TRAINING_METHODS
    return [f"{field}: unknown training method {m!r}; the methods are {sorted(known)}"
            for field, names in (("methods", options.methods),
                                 ("method_options", options.method_options))
            for m in names if m not in known]


@register_measurement("sharpness_aware", options=SharpnessAwareOptions, report=_report,
                      check=_check,
                      summary=_summary,
                      description="SGD vs SAM, ASAM, SAF and MESA on one model under one budget.")
def run_sharpness_aware(ctx, options: SharpnessAwareOptions) -> dict:
    """Train the model with each method; compare accuracy, curvature, time and memory."""
    settings = ctx.config.training_for(options.model)
    epochs = options.epochs if options.epochs is not None else settings.epochs
    return compare_methods(lambda: ctx.build(options.model), ctx.dataset("train"),
                           ctx.dataset("test"), methods=list(options.methods), epochs=epochs,
                           lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay, batch_size=settings.batch_size,
                           seed=settings.seed, loss=settings.loss,
                           method_options=dict(options.method_options),
                           subset=options.subset, sharpness_rho=options.sharpness_rho,
                           tol=options.tol, scheduler=settings.scheduler, progress=ctx.progress)
