"""The trainer, its step rules and callbacks, and safe checkpoints (safetensors + JSON).

``train`` runs mini-batch training on tensors held in memory. How one step updates the
model is a :class:`StepRule` chosen by name from a registry, so SAM, SAF or forward-gradient
training plug in (``register_training_method``) without touching the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ridgeline.data.dataset import Dataset
from ridgeline.errors import (
    ConfigError,
    DataError,
    NonFiniteLossError,
)
from ridgeline.losses import LossFn, accuracy, loss_weight, resolve_loss
from ridgeline.outputs import as_logits
from ridgeline.progress import progress_bar

__all__ = ["train", "TrainResult", "TrainState", "StepRule", "BackpropStep",
           "register_training_method", "TRAINING_METHODS", "save", "load", "Callback",
           "coerce_tensors", "check_hyperparameters"]


# ----------------------------------------------------------------------------- steps
class StepRule:
    """How one training step updates the model.

    Subclasses implement :meth:`step`; ``optimizer`` is the torch optimizer that holds the
    learning rate (schedulers act on it). ``begin_epoch``/``end_epoch`` are optional hooks.
    """

    optimizer: torch.optim.Optimizer

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
             epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the model on one batch; return (loss, outputs), both detached."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        """Called before each epoch."""

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch."""

    def describe(self) -> dict:
        """JSON-safe facts about this rule (for results)."""
        return {"rule": type(self).__name__, "optimizer": type(self.optimizer).__name__}


class BackpropStep(StepRule):
    """Forward, loss, backward, ``optimizer.step()``."""

    def step(self, inputs, targets, indices, epoch):
        self.optimizer.zero_grad(set_to_none=True)
        outputs = as_logits(self.model(inputs))
        loss = self.loss_fn(outputs, targets)
        check_finite(loss, epoch)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), outputs.detach()


def check_finite(loss: torch.Tensor, epoch: int) -> None:
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(
            f"the training loss became {loss.item()} in epoch {epoch}; lower the learning rate, "
            "add gradient clipping, or check the data for NaN/inf.")


def base_optimizer(name: str, params: Iterable, *, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """A plain torch optimizer by name: ``"sgd"``, ``"adam"`` or ``"adamw"``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown base optimizer {name!r}; use 'sgd', 'adam' or 'adamw'.")


@dataclass(frozen=True)
class MethodContext:
    """What a training-method factory may need to build its step rule."""

    model: nn.Module
    loss_fn: LossFn
    lr: float
    momentum: float
    weight_decay: float
    epochs: int
    num_examples: int
    num_outputs: int
    steps_per_epoch: int
    seed: int


TRAINING_METHODS: dict[str, Callable[..., StepRule]] = {}


def register_training_method(name: str):
    """Register ``factory(context: MethodContext, **options) -> StepRule`` under ``name``."""

    def decorate(factory):
        TRAINING_METHODS[name] = factory
        return factory

    return decorate


def _plain(name: str):
    def factory(ctx: MethodContext, **options: Any) -> StepRule:
        if options:
            raise ConfigError(f"optimizer {name!r} takes no options {sorted(options)}; "
                              "pass lr, momentum and weight_decay directly.")
        opt = base_optimizer(name, ctx.model.parameters(), lr=ctx.lr, momentum=ctx.momentum,
                             weight_decay=ctx.weight_decay)
        return BackpropStep(ctx.model, opt, ctx.loss_fn)
    return factory


for _name in ("sgd", "adam", "adamw"):
    register_training_method(_name)(_plain(_name))


def _load_method_plugins() -> None:
    """Import the packages that register further training methods (SAM, SAF, forward)."""
    import importlib

    for module in ("ridgeline.optim", "ridgeline.gradients"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a package not yet present in this checkout
            if exc.name != module:
                raise


# ----------------------------------------------------------------------------- callbacks
@dataclass
class TrainState:
    """What a callback sees after each step."""

    step: int
    epoch: int
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    loss: float
    optimizer: torch.optim.Optimizer
    lr: float


class Callback:
    """Optional hooks; a plain callable is treated as ``on_step``."""

    def on_train_begin(self, model: nn.Module) -> None: ...

    def on_step(self, state: TrainState) -> None: ...

    def on_epoch_end(self, epoch: int, model: nn.Module, record: dict) -> None: ...

    def on_train_end(self, model: nn.Module) -> None: ...


def _hook(callback: Any, name: str) -> Callable | None:
    if hasattr(callback, name):
        return getattr(callback, name)
    if name == "on_step" and callable(callback):
        return callback
    return None


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class TrainResult:
    """History of a training run: one record per epoch (and epoch 0 before training)."""

    history: list[dict]
    steps: int
    time_per_step: float
    method: dict
    seed: int
    config: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.history[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self, ax=None, metric: str = "loss"):
        """Train (and eval) ``metric`` per epoch; returns the Axes."""
        from ridgeline.plotting import new_axes

        ax = new_axes(ax, 5, 3.5)
        epochs = [r["epoch"] for r in self.history]
        for split in ("train", "eval"):
            key = f"{split}_{metric}"
            values = [r.get(key) for r in self.history]
            if any(v is not None for v in values):
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o",
                        ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        return ax


# ----------------------------------------------------------------------------- trainer
def coerce_tensors(data: Any, name: str = "data") -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(inputs, targets, num_classes) from a Dataset, a tensor pair, or a TensorDataset."""
    if isinstance(data, Dataset):
        return data.inputs, data.targets, data.num_classes
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1], None
    tensors = getattr(data, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[0], tensors[1], None
    raise DataError(f"{name} must be a ridgeline Dataset, an (inputs, targets) tuple of tensors, "
                    f"or a TensorDataset; got {type(data).__name__}.")


def _evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
              batch_size: int = 4096) -> tuple[float, float | None]:
    from ridgeline.objective import Objective

    objective = Objective(model, (inputs, targets), loss_fn, batch_size=batch_size, validate=False)
    return objective.loss_and_accuracy()


def train(model: nn.Module, data: Any, *, optimizer: str | torch.optim.Optimizer = "sgd",
          lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0, epochs: int = 10,
          batch_size: int = 128, seed: int = 0, loss: str | LossFn = "cross_entropy",
          eval_data: Any = None, callbacks: Sequence[Any] = (), progress: bool = True,
          scheduler: str | None = None, gradient: str = "backprop",
          **method_options: Any) -> TrainResult:
    """Train ``model`` in place with mini-batches drawn from a seeded permutation.

    Parameters
    ----------
    model : nn.Module
    data : Dataset or (inputs, targets)
    optimizer : {"sgd", "adam", "adamw", "sam", "asam", "saf", "mesa", ...} or a torch optimizer
        A registered training method (see :func:`register_training_method`) or a ready
        optimizer over ``model``'s parameters (plain backprop steps).
    lr, momentum, weight_decay, epochs, batch_size : training hyper-parameters
    seed : int
        Seeds the data order and every random op during training (global RNG state is
        restored afterwards): the same seed gives the same model.
    loss : {"cross_entropy", "mse"} or callable
    eval_data : Dataset or (inputs, targets), optional
        Evaluated after every epoch (exact loss and accuracy, eval mode).
    callbacks : sequence
        Objects with ``on_train_begin/on_step/on_epoch_end/on_train_end``, or callables
        ``f(state: TrainState)`` called after every step.
    scheduler : {None, "cosine", "linear"}
        Learning-rate decay to zero over training, applied to the method's optimizer.
    gradient : {"backprop", "forward"}
        ``"forward"`` trains with forward gradients (see ``ridgeline.gradients``).
    **method_options
        Options of the training method, e.g. ``rho`` for SAM.

    Returns
    -------
    TrainResult
        ``history`` holds, per epoch, the mean training loss and accuracy over the
        epoch's steps and the eval loss and accuracy (epoch 0: before training).
    """
    check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay, epochs=epochs,
                          batch_size=batch_size)
    inputs, targets, num_classes = coerce_tensors(data)
    loss_name, loss_fn = resolve_loss(loss)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    from ridgeline.objective import Objective, module_mode

    # validates every example (finite inputs, label range) and probes shapes and the loss
    Objective(model, (inputs, targets), loss_fn)
    eval_tensors = coerce_tensors(eval_data, "eval_data")[:2] if eval_data is not None else None
    if eval_tensors is not None:
        try:
            Objective(model, eval_tensors, loss_fn)
        except DataError as exc:
            raise DataError(f"eval_data: {exc}") from exc
    num_examples = int(inputs.shape[0])
    steps_per_epoch = math.ceil(num_examples / batch_size)
    with torch.no_grad(), module_mode(model, False):  # eval mode: BN must not see this probe
        probe = inputs[:1].to(device)  # token ids stay integers
        probe = probe.to(dtype) if probe.is_floating_point() else probe
        num_outputs = int(as_logits(model(probe)).shape[-1])

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        rule = _make_rule(model, optimizer, gradient, loss_fn, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, epochs=epochs, num_examples=num_examples,
                          num_outputs=num_outputs, steps_per_epoch=steps_per_epoch, seed=seed,
                          options=method_options)
        sched = _make_scheduler(rule.optimizer, scheduler, epochs * steps_per_epoch)
        order_gen = torch.Generator().manual_seed(seed)
        history: list[dict] = []

        def record(epoch: int, train_loss, train_acc, seconds: float) -> dict:
            entry: dict = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                           "seconds": seconds}
            if eval_tensors is not None:
                entry["eval_loss"], entry["eval_accuracy"] = _evaluate(model, *eval_tensors, loss_fn)
            history.append(entry)
            return entry

        train_loss0, train_acc0 = _evaluate(model, inputs, targets, loss_fn)
        record(0, train_loss0, train_acc0, 0.0)
        for cb in callbacks:
            if (hook := _hook(cb, "on_train_begin")) is not None and hook is not cb:
                hook(model)

        step, step_time = 0, 0.0
        with progress_bar(epochs * steps_per_epoch, "train", progress) as bar:
            for epoch in range(1, epochs + 1):
                model.train()
                rule.begin_epoch(epoch)
                order = torch.randperm(num_examples, generator=order_gen)
                loss_sum, correct, seen = 0.0, 0.0, 0
                for start in range(0, num_examples, batch_size):
                    idx = order[start:start + batch_size]
                    x = inputs[idx].to(device)
                    x = x.to(dtype) if x.is_floating_point() else x
                    y = targets[idx].to(device)
                    began = time.perf_counter()
                    batch_loss, outputs = rule.step(x, y, idx, epoch)
                    if sched is not None:
                        sched.step()
                    step_time += time.perf_counter() - began
                    step += 1
                    value = float(batch_loss)
                    if not math.isfinite(value):
                        raise NonFiniteLossError(
                            f"the training loss became {value} at step {step} (epoch {epoch}); "
                            "lower the learning rate or check the data for NaN/inf.")
                    terms = loss_weight(loss_fn, y)  # examples, or tokens that count
                    loss_sum += value * terms
                    seen += terms
                    if loss_name != "mse" or not targets.is_floating_point():
                        correct += float(accuracy(outputs, y)) * terms
                    state = TrainState(step, epoch, model, x, y, idx, value, rule.optimizer,
                                       rule.optimizer.param_groups[0]["lr"])
                    for cb in callbacks:
                        if (hook := _hook(cb, "on_step")) is not None:
                            hook(state)
                    bar.advance(info=f"epoch {epoch} loss {value:.4f}")
                rule.end_epoch(epoch)
                model.eval()
                classification = not targets.is_floating_point()
                entry = record(epoch, loss_sum / seen, correct / seen if classification else None,
                               step_time)
                for cb in callbacks:
                    if (hook := _hook(cb, "on_epoch_end")) is not None and hook is not cb:
                        hook(epoch, model, entry)
        for cb in callbacks:
            if (hook := _hook(cb, "on_train_end")) is not None and hook is not cb:
                hook(model)
    model.eval()
    return TrainResult(history=history, steps=step, time_per_step=step_time / max(step, 1),
                       method=rule.describe(), seed=seed,
                       config={"optimizer": optimizer if isinstance(optimizer, str) else type(optimizer).__name__,
                               "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                               "epochs": epochs, "batch_size": batch_size, "loss": loss_name,
                               "scheduler": scheduler, "gradient": gradient,
                               **{k: v for k, v in method_options.items()
                                  if isinstance(v, (int, float, str, bool, type(None)))}})


def check_hyperparameters(*, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                          epochs: int = 1, batch_size: int = 1) -> None:
    """Raise :class:`ConfigError` for values no training run can use (checked before any
    work): a negative or non-finite learning rate, momentum outside [0, 1), negative weight
    decay, negative epochs, batch size below 1."""
    problems = []
    if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr >= 0):
        problems.append(f"lr must be a finite number ≥ 0, got {lr}")
    if isinstance(momentum, (int, float)) and not (0 <= momentum < 1):
        problems.append(f"momentum must lie in [0, 1), got {momentum}")
    if isinstance(weight_decay, (int, float)) and not (math.isfinite(weight_decay)
                                                      and weight_decay >= 0):
        problems.append(f"weight_decay must be ≥ 0, got {weight_decay}")
    if epochs < 0:
        problems.append(f"epochs must be ≥ 0, got {epochs}")
    if batch_size < 1:
        problems.append(f"batch_size must be ≥ 1, got {batch_size}")
    if problems:
        raise ConfigError("; ".join(problems) + ". Typical values: lr=0.05, momentum=0.9, "
                          "weight_decay=0, batch_size=128.")


def _make_rule(model, optimizer, gradient, loss_fn, *, options, **context) -> StepRule:
    if isinstance(optimizer, torch.optim.Optimizer):
        if gradient != "backprop" or options:
            raise ConfigError("a ready torch optimizer trains with plain backprop steps; pass a "
                              "method name (e.g. 'sam') to use gradient/method options.")
        return BackpropStep(model, optimizer, loss_fn)
    if isinstance(optimizer, StepRule):
        return optimizer
    ctx = MethodContext(model=model, loss_fn=loss_fn, **context)
    name = optimizer
    if gradient == "forward":
        name, options = "forward", {"base": optimizer, **options}
    elif gradient != "backprop":
        raise ConfigError(f"gradient must be 'backprop' or 'forward', got {gradient!r}.")
    if name not in TRAINING_METHODS:
        _load_method_plugins()
    if name not in TRAINING_METHODS:
        raise ConfigError(f"unknown optimizer {name!r}; known: {sorted(TRAINING_METHODS)}.")
    try:
        return TRAINING_METHODS[name](ctx, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for optimizer {name!r}: {exc}") from exc


def _make_scheduler(optimizer: torch.optim.Optimizer, kind: str | None, total_steps: int):
    if kind is None:
        return None
    total = max(total_steps, 1)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total))
    raise ConfigError(f"scheduler must be None, 'cosine' or 'linear', got {kind!r}.")


# ----------------------------------------------------------------------------- checkpoints
# save/load live in ridgeline.checkpoints; re-exported here for code that imports them from
# ridgeline.train.
from ridgeline.checkpoints import (  # noqa: E402
    CHECKPOINT_FORMAT,
    checkpoint_info,
    load,
    save,
)

__all__ += ["checkpoint_info", "CHECKPOINT_FORMAT"]
