"""Training methods ``"sam"``, ``"asam"``, ``"saf"`` and ``"mesa"`` for :func:`ridgeline.train`.

Each is a :class:`~ridgeline.train.StepRule` built by a registered factory, so
``ridgeline.train(model, data, optimizer="saf", lag=3)`` (or ``ridgeline train --optimizer
saf`` on the command line) trains with it. The rule's ``optimizer`` is the base optimizer,
so learning-rate schedulers act on it.
"""

from __future__ import annotations

import torch

from ridgeline.errors import NonFiniteLossError
from ridgeline.optim.fused import cross_entropy_distillation_value_and_grad, fusable
from ridgeline.optim.mesa import EMATeacherLoss
from ridgeline.optim.saf import TrajectoryLoss, distillation_kl_gradient
from ridgeline.optim.sam import SAM, frozen_norm_stats
from ridgeline.outputs import as_logits
from ridgeline.train import (
    MethodContext,
    StepRule,
    base_optimizer,
    check_finite,
    register_training_method,
)

__all__ = ["SAMStep", "SAFStep", "MESAStep"]


def _base(ctx: MethodContext, name: str) -> torch.optim.Optimizer:
    return base_optimizer(name, ctx.model.parameters(), lr=ctx.lr, momentum=ctx.momentum,
                          weight_decay=ctx.weight_decay)


class SAMStep(StepRule):
    """Forward/backward at θ, ascend to θ + ε, forward/backward there (BatchNorm statistics
    frozen), restore θ and step the base optimizer: two gradient evaluations per step."""

    def __init__(self, model, sam: SAM, loss_fn) -> None:
        super().__init__(model, sam.base_optimizer, loss_fn)
        self.sam = sam

    def step(self, inputs, targets, indices, epoch):
        sam = self.sam
        sam.zero_grad(set_to_none=True)
        outputs = as_logits(self.model(inputs))
        loss = self.loss_fn(outputs, targets)
        check_finite(loss, epoch)
        loss.backward()
        sam.first_step(zero_grad=True)
        with frozen_norm_stats(self.model):  # restored after backward (BN saves them for it)
            perturbed = self.loss_fn(as_logits(self.model(inputs)), targets)
            finite = bool(torch.isfinite(perturbed))
            if finite:
                perturbed.backward()
        if not finite:
            sam.restore()
            sam.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the loss at θ + ε became {perturbed.item()} in epoch {epoch}; θ was restored "
                f"and no step was taken. Lower rho (now {sam.param_groups[0]['rho']}) or the "
                "learning rate.")
        sam.second_step()
        return loss.detach(), outputs.detach()

    def describe(self) -> dict:
        group = self.sam.param_groups[0]
        copy_bytes = sum(p.numel() * p.element_size() for g in self.sam.param_groups
                         for p in g["params"])
        return {"rule": "SAMStep", "optimizer": type(self.optimizer).__name__,
                "adaptive": group["adaptive"], "rho": group["rho"], "eta": group["eta"],
                "memory_bytes": copy_bytes}  # the copy of θ held between the two passes


class _PenaltyStep(StepRule):
    """One forward/backward of loss + a penalty on the outputs; the base optimizer steps."""

    def penalty(self, inputs, outputs, indices, epoch) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step."""

    def step(self, inputs, targets, indices, epoch):
        self.optimizer.zero_grad(set_to_none=True)
        outputs = as_logits(self.model(inputs))
        loss = self.loss_fn(outputs, targets)
        check_finite(loss, epoch)
        penalty = self.penalty(inputs, outputs, indices, epoch)
        (loss + penalty if penalty.requires_grad else loss).backward()
        self.optimizer.step()
        self.after_step()
        return loss.detach(), outputs.detach()


class SAFStep(_PenaltyStep):
    """Loss + SAF's trajectory term (no extra forward or backward pass).

    With cross-entropy on (B, O) class-index logits (the trainer's default loss) the loss
    and the term are computed together
    (:func:`~ridgeline.optim.fused.cross_entropy_distillation_value_and_grad`: one
    log-softmax for both, no autograd node for the loss, the KL's value, which training
    never reads, not evaluated) and the backward pass starts from their combined gradient
    on the logits. With any other loss (MSE, a custom callable, probability targets) the
    term enters the same backward pass as its closed-form gradient
    (:meth:`TrajectoryLoss.gradient`), a second root. Before the term starts, the step is
    the base optimizer's. Either way the update is that of ``(loss + term).backward()``.
    The buffer's writes are deferred a few batches (:meth:`TrajectoryLoss.exchange`).
    """

    def __init__(self, model, optimizer, loss_fn, trajectory: TrajectoryLoss) -> None:
        super().__init__(model, optimizer, loss_fn)
        self.trajectory = trajectory
        self._workspace: dict = {}  # the fused computation's work tensors, kept between steps

    def penalty(self, inputs, outputs, indices, epoch):
        return self.trajectory(outputs, indices, epoch)

    def step(self, inputs, targets, indices, epoch):
        self.optimizer.zero_grad(set_to_none=True)
        outputs = as_logits(self.model(inputs))
        trajectory = self.trajectory
        found = trajectory.exchange(outputs, indices, epoch, defer=True)
        if found is None:
            loss = self.loss_fn(outputs, targets)
            check_finite(loss, epoch)
            loss.backward()
        elif fusable(self.loss_fn, outputs, targets):
            loss, grad = cross_entropy_distillation_value_and_grad(
                outputs, targets, found[0], trajectory.temperature, weight=trajectory.weight,
                mask=found[1], workspace=self._workspace)
            check_finite(loss, epoch)
            outputs.backward(grad)
        else:
            loss = self.loss_fn(outputs, targets)
            check_finite(loss, epoch)
            grad = distillation_kl_gradient(found[0], outputs, trajectory.temperature,
                                            found[1], weight=trajectory.weight)
            torch.autograd.backward((loss, outputs), (None, grad))
        self.optimizer.step()
        return loss.detach(), outputs.detach()

    def describe(self) -> dict:
        return {"rule": "SAFStep", "optimizer": type(self.optimizer).__name__,
                **self.trajectory.describe()}


class MESAStep(_PenaltyStep):
    """Loss + KL to an EMA teacher (one extra forward); the teacher follows every step.
    With cross-entropy on (B, O) class-index logits the loss and the KL are computed
    together and backpropagated as one gradient on the logits, as for SAF; other losses
    add the KL's autograd node (:func:`~ridgeline.optim.saf.distillation_kl`)."""

    def __init__(self, model, optimizer, loss_fn, teacher: EMATeacherLoss) -> None:
        super().__init__(model, optimizer, loss_fn)
        self.teacher = teacher
        self._workspace: dict = {}

    def penalty(self, inputs, outputs, indices, epoch):
        return self.teacher(inputs, outputs, epoch)

    def step(self, inputs, targets, indices, epoch):
        self.optimizer.zero_grad(set_to_none=True)
        outputs = as_logits(self.model(inputs))
        teacher = self.teacher
        if teacher.active(epoch) and fusable(self.loss_fn, outputs, targets):
            loss, grad = cross_entropy_distillation_value_and_grad(
                outputs, targets, teacher.logits(inputs), teacher.temperature,
                weight=teacher.weight, workspace=self._workspace)
            check_finite(loss, epoch)
            outputs.backward(grad)
        else:
            loss = self.loss_fn(outputs, targets)
            check_finite(loss, epoch)
            penalty = teacher(inputs, outputs, epoch)
            (loss + penalty if penalty.requires_grad else loss).backward()
        self.optimizer.step()
        teacher.update()
        return loss.detach(), outputs.detach()

    def after_step(self) -> None:
        self.teacher.update()

    def describe(self) -> dict:
        return {"rule": "MESAStep", "optimizer": type(self.optimizer).__name__,
                **self.teacher.describe()}


def _sam_factory(adaptive: bool):
    def factory(ctx: MethodContext, *, rho: float | None = None, base: str = "sgd",
                eta: float = 0.0) -> SAMStep:
        """SAM (``rho`` default 0.05) or ASAM (``rho`` default 2.0, offset ``eta``) over the
        base optimizer ``base`` ("sgd", "adam", "adamw") built with the run's lr/momentum."""
        inner = _base(ctx, base)
        sam = SAM(list(ctx.model.parameters()), inner, rho=rho, adaptive=adaptive, eta=eta,
                  model=ctx.model)
        return SAMStep(ctx.model, sam, ctx.loss_fn)
    return factory


register_training_method("sam")(_sam_factory(adaptive=False))
register_training_method("asam")(_sam_factory(adaptive=True))


@register_training_method("saf")
def saf_method(ctx: MethodContext, *, base: str = "sgd", lag: int = 3, temperature: float = 5.0,
               weight: float = 0.3, start_epoch: int = 5, dtype: str = "float16") -> SAFStep:
    """SAF (Du et al. 2022): the base optimizer on loss + λτ²·KL to the logits of ``lag``
    epochs earlier (ring buffer of ``lag + 1`` epochs of logits in ``dtype``)."""
    trajectory = TrajectoryLoss(ctx.num_examples, ctx.num_outputs, lag=lag,
                                temperature=temperature, weight=weight, start_epoch=start_epoch,
                                dtype=dtype)
    return SAFStep(ctx.model, _base(ctx, base), ctx.loss_fn, trajectory)


@register_training_method("mesa")
def mesa_method(ctx: MethodContext, *, base: str = "sgd", decay: float | None = None,
                temperature: float = 5.0, weight: float = 0.8, start_epoch: int = 5) -> MESAStep:
    """MESA (Du et al. 2022): the base optimizer on loss + λτ²·KL to an EMA teacher.

    ``decay=None`` picks d = 1 − 1/(3 · steps per epoch), an EMA horizon of about three
    epochs (SAF's lag): 0.99973 at the authors' ImageNet setting (1251 steps per epoch),
    close to the 0.9998 of their code (the default of :class:`EMATeacherLoss`)."""
    if decay is None:
        decay = 1.0 - 1.0 / (3 * max(ctx.steps_per_epoch, 1))
    teacher = EMATeacherLoss(ctx.model, decay=decay, temperature=temperature, weight=weight,
                             start_epoch=start_epoch)
    return MESAStep(ctx.model, _base(ctx, base), ctx.loss_fn, teacher)
