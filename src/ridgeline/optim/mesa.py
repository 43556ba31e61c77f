"""MESA: SAF's trajectory loss with an exponential-moving-average teacher instead of stored logits."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ridgeline.errors import ConfigError
from ridgeline.optim.saf import distillation_kl
from ridgeline.optim.schedule import KLStart
from ridgeline.outputs import as_logits

__all__ = ["EMATeacherLoss"]


class EMATeacherLoss:
    r"""MESA's loss: KL to an exponential moving average (EMA) of the model's own weights.

    The teacher's weights follow θ_T ← d · θ_T + (1 − d) · θ after every optimizer step
    (:meth:`update`; floating-point buffers such as BatchNorm statistics are averaged the
    same way, integer ones copied). For a batch with current logits f(x; θ_t) the term is

    .. math:: λ τ^2 \frac1{|B|} \sum_{i∈B} \mathrm{KL}\big(\mathrm{softmax}(f(x_i;θ_T)/τ)
              \,\big\|\, \mathrm{softmax}(f(x_i;θ_t)/τ)\big),

    with the teacher evaluated in eval mode without gradients: one extra forward pass per
    step and no per-example memory (one copy of the weights instead).

    Parameters
    ----------
    model : nn.Module
        The student; the teacher starts as a copy of it.
    decay : float
        d in [0, 1) (0.9998: the authors' code, ``MESA_train.py``, for ImageNet-length runs;
        choose 1 − d ≈ 1/(a few epochs of steps) for short runs).
    temperature : float
        τ > 0 (paper: 5).
    weight : float
        λ ≥ 0 (paper: 0.8).
    start_epoch : int
        The authors' ``kl_start_epoch`` (their default 5): the term is on in every epoch
        *after* it, counting epochs from 0 — ``epoch − first_epoch > start_epoch``, exactly
        their ``epoch > args.kl_start_epoch`` with 0-based epochs (as for SAF). With
        ridgeline's epochs (counted from 1) the first epoch with a term is
        ``start_epoch + 2`` (:attr:`first_active_epoch`). The EMA is updated from the first
        step on.
    first_epoch : int
        The number the caller gives its first epoch: 1 for :func:`ridgeline.train`, 0 for a
        ``range(epochs)`` loop as in the authors' code.

    References
    ----------
    Du, Zhou, Feng, Ong & Goh (2022), "Sharpness-Aware Training for Free", NeurIPS (§4, MESA);
    their code, github.com/AngusDujw/SAF, ``MESA_train.py`` (``epoch > args.kl_start_epoch``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, temperature: float = 5.0,
                 weight: float = 0.8, start_epoch: int = 5, first_epoch: int = 1) -> None:
        if not (0.0 <= decay < 1.0):
            raise ConfigError(f"decay must be in [0, 1), got {decay}.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {temperature}.")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"weight must be ≥ 0, got {weight}.")
        self.model = model
        self.decay, self.temperature, self.weight = float(decay), float(temperature), float(weight)
        self.start_epoch, self.first_epoch = int(start_epoch), int(first_epoch)
        self._start = KLStart(self.start_epoch, self.first_epoch)
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._pairs = [(t, s) for t, s in zip(self.teacher.parameters(), model.parameters())]
        buffers = list(zip(self.teacher.buffers(), model.buffers()))
        self._float_buffers = [(t, s) for t, s in buffers if t.is_floating_point()]
        self._other_buffers = [(t, s) for t, s in buffers if not t.is_floating_point()]
        self.updates = 0

    @property
    def first_active_epoch(self) -> int:
        """The first epoch (in the caller's numbering) with a term: ``first_epoch +
        start_epoch + 1`` (7 for ridgeline's 1-based epochs and the default start_epoch = 5)."""
        return self._start.first_active_epoch

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the teacher's parameters and buffers."""
        return sum(t.numel() * t.element_size()
                   for t in (*self.teacher.parameters(), *self.teacher.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        """θ_T ← d θ_T + (1 − d) θ (call after each optimizer step)."""
        weight = 1.0 - self.decay
        for pairs in (self._pairs, self._float_buffers):
            if pairs:
                teacher, student = zip(*pairs)
                torch._foreach_lerp_(list(teacher), [s.detach() for s in student], weight)
        for t, s in self._other_buffers:
            t.copy_(s)
        self.updates += 1

    def active(self, epoch: int) -> bool:
        """Whether the term is non-zero in ``epoch``: after ``start_epoch`` and λ > 0."""
        return self.weight > 0 and self._start.active(epoch)

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``inputs`` (eval mode, no gradient)."""
        return as_logits(self.teacher(inputs))

    def __call__(self, inputs: torch.Tensor, outputs: torch.Tensor, epoch: int) -> torch.Tensor:
        """λ τ² · mean KL(teacher ‖ student) on this batch (0 before
        :attr:`first_active_epoch`)."""
        if not self.active(epoch):
            return outputs.new_zeros(())
        return distillation_kl(self.logits(inputs), outputs, self.temperature, weight=self.weight)

    def describe(self) -> dict:
        return {"decay": self.decay, "temperature": self.temperature, "weight": self.weight,
                "start_epoch": self.start_epoch, "first_epoch": self.first_epoch,
                "first_active_epoch": self.first_active_epoch, "memory_bytes": self.memory_bytes}
