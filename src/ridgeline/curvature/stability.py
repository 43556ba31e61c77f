"""Edge of stability: the top Hessian eigenvalue during training against 2/η (Cohen et al.)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ridgeline.curvature.spectrum import top_eigenvalues
from ridgeline.data.dataset import Dataset
from ridgeline.errors import ConfigError, ConvergenceWarning, DataError
from ridgeline.objective import Objective

__all__ = ["EdgeOfStability", "stability_threshold", "optimizer_settings"]


def _fixed_subset(subset: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(subset, int) and not isinstance(subset, bool):
        if data is None:
            raise ConfigError("subset is a number of examples, so pass the training data too: "
                              "EdgeOfStability(data=train_data, subset=1000, ...), or pass "
                              "the subset itself as subset=(inputs, targets).")
        if subset < 1:
            raise ConfigError(f"subset must be a positive number of examples, got {subset}.")
        inputs, targets = data.as_tuple() if isinstance(data, Dataset) else data
        return inputs[:subset], targets[:subset]
    if isinstance(subset, Dataset):
        return subset.as_tuple()
    if isinstance(subset, (tuple, list)) and len(subset) == 2:
        return subset[0], subset[1]
    raise DataError(f"subset must be a Dataset, an (inputs, targets) tuple, or a number of "
                    f"examples of `data`; got {type(subset).__name__}.")


def stability_threshold(lr: float, momentum: float = 0.0, *, nesterov: bool = False,
                        dampening: float = 0.0, weight_decay: float = 0.0) -> float:
    """Largest Hessian eigenvalue for which torch's SGD is stable on a quadratic.

    On L(θ) = ½ λ θ² (one eigendirection of the Hessian) ``torch.optim.SGD`` iterates a
    linear recursion whose characteristic polynomial has both roots inside the unit circle
    exactly while λ_eff = λ + weight_decay satisfies (Jury's criterion, p(−1) > 0):

    * plain gradient descent: λ_eff < 2/η;
    * heavy-ball momentum β, dampening τ (b ← βb + (1−τ)g, θ ← θ − ηb):
      λ_eff < (2 + 2β) / (η (1 − τ));
    * Nesterov (b ← βb + g, θ ← θ − η(g + βb)): λ_eff < (2 + 2β) / (η (1 + 2β)).

    The weight decay of torch's SGD adds weight_decay·I to the Hessian, so the threshold
    for the eigenvalues of the loss Hessian is the value above minus ``weight_decay``.

    Parameters
    ----------
    lr : float
        η > 0.
    momentum, nesterov, dampening, weight_decay : as in ``torch.optim.SGD``.

    Returns
    -------
    float

    References
    ----------
    Cohen, Kaur, Li, Kolter & Talwalkar (2021), "Gradient descent on neural networks
    typically occurs at the edge of stability", ICLR (appendix: momentum thresholds).
    """
    if lr <= 0:
        raise ConfigError(f"lr must be positive, got {lr}.")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must lie in [0, 1), got {momentum}.")
    if not 0 <= dampening < 1:
        raise ConfigError(f"dampening must lie in [0, 1), got {dampening}.")
    if nesterov:
        if dampening:
            raise ConfigError("Nesterov momentum needs dampening = 0 (as in torch.optim.SGD).")
        bound = (2 + 2 * momentum) / (lr * (1 + 2 * momentum))
    else:
        bound = (2 + 2 * momentum) / (lr * (1 - dampening)) if momentum else 2 / lr
    return bound - weight_decay


def optimizer_settings(optimizer: Any) -> dict | None:
    """What the stability threshold needs from an optimizer's first parameter group.

    Returns ``{"optimizer", "momentum", "nesterov", "dampening", "weight_decay"}`` read from
    ``param_groups[0]`` of a ``torch.optim.SGD`` (or any optimizer whose groups carry
    ``momentum``), or ``None`` for an optimizer without a known threshold (Adam, …).
    """
    if optimizer is None or not getattr(optimizer, "param_groups", None):
        return None
    group = optimizer.param_groups[0]
    if "momentum" not in group:
        return None
    return {"optimizer": type(optimizer).__name__, "momentum": float(group["momentum"]),
            "nesterov": bool(group.get("nesterov", False)),
            "dampening": float(group.get("dampening", 0.0)),
            "weight_decay": float(group.get("weight_decay", 0.0))}


class EdgeOfStability:
    """Trainer callback recording the top Hessian eigenvalues on a fixed subset.

    Every ``every`` steps (and before training) it computes the top-k eigenvalues of the
    Hessian of the loss on a fixed subset of the training data, by Lanczos warm-started
    from the previous top eigenvector. Gradient descent with step η on a quadratic is
    stable only while λ_max < 2/η (heavy-ball momentum β: (2 + 2β)/η; Nesterov, dampening
    and weight decay: :func:`stability_threshold`); Cohen et al. found that full-batch
    training drives λ_max up to that threshold and hovers there ("edge of stability").

    Parameters
    ----------
    subset : Dataset, (inputs, targets) or int
        The fixed examples; an int takes the first ``subset`` examples of ``data``.
    every : int
        Record every this many steps.
    lr : float, optional
        η for the threshold; default the optimizer's current learning rate at each record.
    momentum : float or None
        β for the heavy-ball threshold (2 + 2β)/η. ``None`` (default) reads momentum β,
        ``nesterov``, ``dampening`` and ``weight_decay`` from the optimizer's first
        parameter group at each record (``ridgeline.train`` uses β = 0.9 by default); an
        optimizer without ``momentum`` in its groups (Adam, …) has no such threshold and
        the record's ``threshold`` is ``None``. The record before the first step takes
        them from the first step's optimizer.
    k : int
        Eigenvalues per record.
    data : training data, when ``subset`` is an int.
    loss : {"cross_entropy", "mse"} or callable
    tol, max_iter, seed : Lanczos settings.

    Attributes
    ----------
    records : list of dict
        step, epoch, eigenvalues, lr, momentum, nesterov, dampening, weight_decay,
        optimizer, settings ("optimizer" when read from it, "given" when passed), threshold,
        loss, matvecs, converged.

    Examples
    --------
    >>> eos = EdgeOfStability(subset=train.subset(500), every=20)
    >>> ridgeline.train(model, train, lr=0.05, momentum=0.0, callbacks=[eos])  # doctest: +SKIP
    >>> eos.plot()                                                           # doctest: +SKIP

    References
    ----------
    Cohen, Kaur, Li, Kolter & Talwalkar (2021), "Gradient descent on neural networks
    typically occurs at the edge of stability".
    """

    def __init__(self, *, subset: Any, every: int = 50, lr: float | None = None,
                 momentum: float | None = None, k: int = 1, data: Any = None,
                 loss: str | Callable = "cross_entropy", tol: float = 1e-3,
                 max_iter: int | None = None, seed: int = 0) -> None:
        if every < 1:
            raise ConfigError(f"every must be a positive number of steps, got {every}.")
        if lr is not None and lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}.")
        if momentum is not None and not 0 <= momentum < 1:
            raise ConfigError(f"momentum must lie in [0, 1), got {momentum}.")
        self.inputs, self.targets = _fixed_subset(subset, data)
        self.every, self.lr, self.momentum, self.k = int(every), lr, momentum, int(k)
        self.loss, self.tol, self.max_iter, self.seed = loss, tol, max_iter, seed
        self.records: list[dict] = []
        self._pending: list[dict] = []
        self._v0: torch.Tensor | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, model: nn.Module) -> None:
        self._record(model, step=0, epoch=0, lr=self.lr, settings=self._given())

    def on_step(self, state: Any) -> None:
        settings = self._given()
        if settings is None:
            settings = optimizer_settings(state.optimizer)
            settings = {"optimizer": type(state.optimizer).__name__, **(settings or {}),
                        "settings": "optimizer"}
        for record in self._pending:  # recorded before the optimizer was known
            record.update(settings)
            record["threshold"] = self._threshold(record)
        self._pending.clear()
        if state.step % self.every == 0:
            lr = self.lr if self.lr is not None else state.lr
            self._record(state.model, step=state.step, epoch=state.epoch, lr=lr,
                         settings=settings)

    def _given(self) -> dict | None:
        if self.momentum is None:
            return None
        return {"momentum": float(self.momentum), "nesterov": False, "dampening": 0.0,
                "weight_decay": 0.0, "optimizer": None, "settings": "given"}

    @staticmethod
    def _threshold(record: dict) -> float | None:
        """(2 + 2β)/η and its variants (:func:`stability_threshold`); None when unknown."""
        if not record["lr"] or record.get("momentum") is None:
            return None
        return stability_threshold(record["lr"], record["momentum"],
                                   nesterov=record["nesterov"], dampening=record["dampening"],
                                   weight_decay=record["weight_decay"])

    def on_epoch_end(self, epoch: int, model: nn.Module, record: dict) -> None:
        """Nothing per epoch."""

    def on_train_end(self, model: nn.Module) -> None:
        """Nothing at the end (the last record is the last multiple of ``every``)."""

    # ------------------------------------------------------------------ work
    def _record(self, model: nn.Module, *, step: int, epoch: int, lr: float | None,
                settings: dict | None) -> None:
        if step == self._last_step:
            return
        self._last_step = step
        device = next(model.parameters()).device
        objective = Objective(model, (self.inputs.to(device), self.targets.to(device)), self.loss,
                              validate=not self.records)
        v0 = self._v0 if self._v0 is not None and self._v0.device == device else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            spectrum = top_eigenvalues(objective, k=self.k, tol=self.tol, max_iter=self.max_iter,
                                       seed=self.seed, v0=v0)
        for warning in caught:
            if not issubclass(warning.category, ConvergenceWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                       warning.lineno)
        self._v0 = spectrum.vectors[0].detach().clone()
        record = {"step": step, "epoch": epoch, "eigenvalues": spectrum.values.tolist(),
                  "lr": lr, "momentum": None, "nesterov": None, "dampening": None,
                  "weight_decay": None, "optimizer": None, "settings": None,
                  "loss": float(objective.loss()), "matvecs": spectrum.matvecs,
                  "converged": spectrum.converged}
        record.update(settings or {})
        record["threshold"] = self._threshold(record)
        self.records.append(record)
        if settings is None:
            self._pending.append(record)

    # ------------------------------------------------------------------ results
    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self.records]

    @property
    def sharpness(self) -> list[float]:
        """λ_max at each record."""
        return [r["eigenvalues"][0] for r in self.records]

    def to_dict(self) -> dict:
        return {"every": self.every, "subset_size": int(self.inputs.shape[0]), "k": self.k,
                "lr": self.lr, "momentum": self.momentum, "tol": self.tol,
                "records": [dict(r) for r in self.records]}

    def plot(self, ax=None):
        """λ_1…λ_k against the step, with the stability threshold (2 + 2β)/η dashed."""
        if ax is None:
            from ridgeline.plotting import new_figure

            _, ax = new_figure(5, 3.5)
        if not self.records:
            return ax
        steps = self.steps
        for i in range(len(self.records[0]["eigenvalues"])):
            ax.plot(steps, [r["eigenvalues"][i] for r in self.records], "o-", ms=3,
                    label="λ_max" if i == 0 else f"λ_{i + 1}")
        thresholds = [r["threshold"] if r["threshold"] is not None else math.nan
                      for r in self.records]
        momenta = {r["momentum"] or 0.0 for r in self.records}
        label = "2/η" if momenta == {0.0} else "stability threshold"
        ax.plot(steps, thresholds, "k--", lw=1, label=label)
        if momenta != {0.0}:
            ax.plot(steps, [2 / r["lr"] if r["lr"] else math.nan for r in self.records], ":",
                    color="gray", lw=1, label="2/η")
        ax.set_xlabel("step")
        ax.set_ylabel("top Hessian eigenvalue")
        ax.legend()
        return ax
