"""Cross-entropy and SAF's/MESA's distillation KL computed together (one softmax pass).

SAF's and MESA's training loss is the mean cross-entropy plus λτ²·mean KL to a teacher's
logits (Du et al. 2022, "Sharpness-Aware Training for Free"). Training reads the
cross-entropy's value and the gradient of the sum; this module computes both with a
handful of kernels and hands the backward pass one combined gradient on the logits (one
root), instead of torch's cross-entropy node plus the KL's gradient or node.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ridgeline.losses import IGNORE_INDEX
from ridgeline.losses import cross_entropy as _ridgeline_cross_entropy

__all__ = ["cross_entropy_distillation", "cross_entropy_distillation_value_and_grad", "fusable"]

#: the loss functions whose (B, O) logits / (B,) class-index form the fused node reproduces
_CROSS_ENTROPIES = (F.cross_entropy, _ridgeline_cross_entropy)


def fusable(loss_fn, outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether :func:`cross_entropy_distillation` computes ``loss_fn(outputs, targets)``
    exactly: ``loss_fn`` is torch's or ridgeline's cross-entropy (mean, ignore index −100),
    ``outputs`` are (B, O) floating-point logits and ``targets`` (B,) class indices. Other
    losses (MSE, a custom callable), probability targets and token logits (N, T, V) take
    the unfused path."""
    return (loss_fn in _CROSS_ENTROPIES and outputs.dim() == 2 and targets.dim() == 1
            and not targets.is_floating_point() and targets.shape[0] == outputs.shape[0]
            and outputs.shape[0] > 0 and outputs.is_floating_point())


class _Plan:
    """Everything one shape of the fused computation reuses between calls: the work tensors
    (rows, log-probabilities, gradient) and the constants (1/τ, the rows' weights, the
    one-hot value). Inside a training step, where the forward pass has just evicted the
    caches, each fresh small tensor costs about as much as a small kernel."""

    def __init__(self, batch: int, classes: int, dtype: torch.dtype, device: torch.device,
                 temperature: float, weight: float) -> None:
        plain = temperature == 1.0
        self.count = 2 if plain else 3
        self.rows = torch.empty(self.count, classes, batch, dtype=dtype, device=device)
        self.logs = torch.empty_like(self.rows)
        self.grad = torch.empty(1, classes * batch, dtype=dtype, device=device)
        self.inverse = torch.full((1,), 1.0 / temperature, dtype=dtype, device=device)
        self.scales = torch.tensor([1.0, 1.0 / temperature], dtype=dtype,
                                   device=device).view(2, 1, 1)  # rows f and f/τ in one product
        kl = weight * temperature / batch  # ∂/∂f_i of λτ²/B·KL_i is λτ/B·(q_i − p_i)
        values = (1.0 / batch + kl, -kl) if plain else (1.0 / batch, kl, -kl)  # rows' weights
        self.kl = kl
        self.coef = torch.tensor([values], dtype=dtype, device=device)
        self.onehot = torch.full((1, batch), -1.0 / batch, dtype=dtype, device=device)
        self.cpu = device.type == "cpu"
        # views fixed once (the work tensors are overwritten in place): Python-side
        # indexing costs microseconds per call
        self.student = self.rows[:1] if plain else self.rows[:2]
        self.teacher = self.rows[-1]
        self.log_student = self.logs[0].t()                       # log softmax(f) as (B, O)
        self.flat = self.logs.view(self.count, -1)                # the probabilities after exp_
        self.grad_t = self.grad.view(classes, batch).t()          # the (B, O) gradient


def _plan(workspace: dict | None, z: torch.Tensor, temperature: float, weight: float) -> _Plan:
    batch, classes = z.shape
    key = (batch, classes, z.dtype, z.device, temperature, weight)
    plan = None if workspace is None else workspace.get(key)
    if plan is None:
        plan = _Plan(batch, classes, torch.promote_types(z.dtype, torch.float32), z.device,
                     temperature, weight)
        if workspace is not None:
            if len(workspace) > 16:
                workspace.clear()
            workspace[key] = plan
    return plan


def cross_entropy_distillation_value_and_grad(
        outputs: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
        temperature: float, *, weight: float, mask: torch.Tensor | None = None,
        workspace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(mean cross-entropy, ∂(CE + λτ²·(1/B) Σ_i m_i KL_i)/∂f) without an autograd graph.

    The formulas are those of :func:`cross_entropy_distillation`; the gradient is a (B, O)
    tensor in the dtype of ``outputs`` (a transposed view of an (O, B) tensor). Train with
    ``outputs.backward(grad)``: one backward root, no autograd node for the loss at all,
    which is what the ``"saf"`` and ``"mesa"`` methods do.

    ``workspace`` (a dict owned by the caller) keeps the work tensors and constants between
    calls (see :class:`_Plan`); the returned gradient then lives in the workspace and is
    overwritten by the next call with it: backpropagate it before calling again.
    """
    z = outputs.detach()
    batch = z.shape[0]
    plan = _plan(workspace, z, float(temperature), float(weight))
    count, rows = plan.count, plan.rows
    # rows f, [f/τ,] t/τ stacked as (·, O, B): one log-softmax and one exp serve all of them,
    # along the class axis of this layout (torch's CPU (log-)softmax over a short last axis
    # is ≈10× slower for O = 10). Written row by row (a stack of mixed dtypes is much
    # slower); a product with a (1,) tensor of the compute dtype converts a float16 teacher
    # exactly before scaling it.
    if count == 2:
        plan.student[0].copy_(z.t())
        plan.teacher.copy_(teacher_logits.t())
    else:
        torch.mul(z.t(), plan.scales, out=plan.student)
        torch.mul(teacher_logits.t(), plan.inverse, out=plan.teacher)
    logs = torch.log_softmax(rows, 1, out=plan.logs)
    cpu = plan.cpu
    if cpu:  # ignored targets show up below, where the one-hot scatter rejects −100
        loss, all_count = F.nll_loss(plan.log_student, targets), True
    else:  # a scatter out of range would be a device-side assert: count the targets first
        loss, counted = torch.ops.aten.nll_loss_forward.default(plan.log_student, targets, None,
                                                                1, IGNORE_INDEX)
        all_count = float(counted) == batch
    probs = logs.exp_()  # softmax(f), [softmax(f/τ),] softmax(t/τ)
    grad = None
    if mask is None and all_count:
        # one (1, k) × (k, O·B) product for the whole linear combination, then the one-hot
        torch.mm(plan.coef, plan.flat, out=plan.grad)
        try:  # scatter checks bounds (it never wraps negative indices): −100 raises here
            plan.grad.view(-1, batch).scatter_add_(0, targets.view(1, batch), plan.onehot)
            grad = plan.grad_t
        except RuntimeError:
            if not cpu:
                raise
    if grad is None:  # ignored targets (−100) and/or examples without a teacher (mask)
        dtype = rows.dtype
        factor = plan.kl if mask is None else mask.to(dtype) * plan.kl
        grad = torch.sub(probs[-2], probs[-1]).mul_(factor)
        keep = (targets != IGNORE_INDEX).to(dtype)
        n = float(keep.sum())
        if n > 0:
            grad.add_(probs[0] * (keep / n))
            safe = torch.where(targets == IGNORE_INDEX, 0, targets)
            grad.scatter_add_(0, safe.view(1, batch), (keep * (-1.0 / n)).view(1, batch))
        grad = grad.t()
    if rows.dtype != outputs.dtype:
        return loss.to(outputs.dtype), grad.to(outputs.dtype)
    return loss, grad


class _CrossEntropyDistillation(torch.autograd.Function):
    """Value: mean cross-entropy; gradient: that of CE + λτ²·(1/B) Σ_i m_i KL_i (closed form,
    computed in the forward pass and kept for backward)."""

    @staticmethod
    def forward(ctx, outputs, targets, teacher, mask, weight, temperature):
        loss, ctx.grad = cross_entropy_distillation_value_and_grad(
            outputs, targets, teacher, temperature, weight=weight, mask=mask)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        del ctx.grad
        return grad * grad_output, None, None, None, None, None


def cross_entropy_distillation(outputs: torch.Tensor, targets: torch.Tensor,
                               teacher_logits: torch.Tensor, temperature: float, *,
                               weight: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""The mean cross-entropy of ``outputs``, whose backward pass is the gradient of

    .. math:: \mathrm{CE}(f, y) + λ τ^2 \frac1B \sum_i m_i
              \mathrm{KL}\big(\mathrm{softmax}(t_i/τ) \,\|\, \mathrm{softmax}(f_i/τ)\big),

    SAF's and MESA's training loss (Du et al. 2022), with the teacher logits t held fixed:

    .. math:: \frac{∂}{∂f_i} = \frac{w_i}{n}\big(\mathrm{softmax}(f_i) − e_{y_i}\big)
              + \frac{λ τ m_i}{B}\big(\mathrm{softmax}(f_i/τ) − \mathrm{softmax}(t_i/τ)\big),

    where w_i = 0 for an ignored target (−100) and n = Σ_i w_i (torch's mean). Returning the
    cross-entropy alone, not the sum, is deliberate: the trainer reports it, and the KL's
    value, which training never reads, is not evaluated. One autograd node replaces the
    cross-entropy's two and the KL's; f, f/τ and t/τ are stacked as (·, O, B) so that one
    log-softmax and one exp serve all three (at τ = 1, softmax(f) serves both terms), and
    the gradient is one small matrix product plus the one-hot part.

    Parameters
    ----------
    outputs : (B, O) logits (any floating dtype; computed in at least float32)
    targets : (B,) class indices, −100 for an ignored example
    teacher_logits : (B, O) logits of the teacher (any floating dtype; no gradient)
    temperature : τ > 0
    weight : λ ≥ 0
    mask : (B,) weights m_i of the KL terms (0 drops an example), optional; the KL mean is
        over all B examples either way.
    """
    return _CrossEntropyDistillation.apply(outputs, targets, teacher_logits, mask,
                                           float(weight), float(temperature))
