"""Training driven by forward gradients: the step rule and the ``"forward"`` method.

``ridgeline.train(model, data, gradient="forward", optimizer="sgd", guess="local")`` builds
:class:`ForwardGradientSGD` through the registered method ``"forward"``; the same class can
be passed to ``train`` directly (it is a :class:`~ridgeline.train.StepRule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ridgeline.errors import ConfigError
from ridgeline.gradients.forward import COMBINE, check_num_guesses, forward_gradient
from ridgeline.gradients.guesses import Guess
from ridgeline.gradients.resolve import resolve_guess
from ridgeline.losses import LossFn, resolve_loss
from ridgeline.objective import Objective
from ridgeline.outputs import as_logits
from ridgeline.params import make_generator
from ridgeline.train import (
    MethodContext,
    StepRule,
    base_optimizer,
    check_finite,
    register_training_method,
)

__all__ = ["ForwardGradientSGD"]


class ForwardGradientSGD(StepRule):
    """Update the model with a forward-gradient estimate ĝ in place of the backprop gradient.

    Each step evaluates, on the mini-batch, the directional derivatives of the loss along
    the guesses (``torch.func.jvp``, no backward pass through the network), builds ĝ as in
    :func:`~ridgeline.gradients.forward_gradient`, writes it to ``p.grad`` and calls the base
    optimizer (SGD with momentum by default, or Adam/AdamW), so weight decay, momentum and
    learning-rate schedules work unchanged. A no-grad forward pass in the model's current
    mode gives the step's outputs and updates BatchNorm running statistics, as a backprop
    forward pass would.

    With ``guess="local"`` a :class:`~ridgeline.gradients.LocalGuess` is built on the model;
    its auxiliary heads are trained alongside (their own Adam, ``head_lr``) on the same
    local-loss gradients that give the guesses (Fournier et al. 2023).

    Parameters
    ----------
    model : nn.Module
    lr, momentum, weight_decay : hyper-parameters of the base optimizer
    base : {"sgd", "adam", "adamw"}
    guess : {"random", "rademacher", "local", "previous"}, Guess or callable
    num_guesses : int
        K directional derivatives per step (per block for local guesses).
    combine : {"mean", "span"}
    loss : {"cross_entropy", "mse"} or callable
    seed : int
        Seeds the random guesses.
    blocks, head, head_lr : options of the local guess
    chunk_size : int, optional
        Guesses per vmapped batch of jvps.

    Notes
    -----
    A random Gaussian estimate has E‖ĝ‖² = (P + 2)‖g‖² for P parameters, so with random
    guesses the learning rate must be far smaller than for backprop (or use ``base="adam"``);
    projected (local, informed) estimates satisfy ‖ĝ‖ ≤ ‖g‖.

    References
    ----------
    Baydin et al. (2022), "Gradients without backpropagation"; Fournier et al. (2023), "Can
    forward gradient match backpropagation?".
    """

    def __init__(self, model: nn.Module, *, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0, base: str = "sgd", guess: Any = "random",
                 num_guesses: int = 1, combine: str = "mean", loss: str | LossFn = "cross_entropy",
                 seed: int = 0, blocks: int | Sequence[int] | None = None, head: str = "linear",
                 head_lr: float = 1e-3, chunk_size: int | None = None) -> None:
        self.num_guesses = check_num_guesses(num_guesses)
        if combine not in COMBINE:
            raise ConfigError(f"combine must be 'mean' or 'span', got {combine!r}.")
        optimizer = base_optimizer(base, model.parameters(), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)
        super().__init__(model, optimizer, resolve_loss(loss)[1])
        self.base, self.combine, self.chunk_size = base, combine, chunk_size
        if guess == "local":
            from ridgeline.gradients.local import LocalGuess

            guess = LocalGuess(model, blocks=blocks, head=head, loss=self.loss_fn, lr=head_lr,
                               train_heads=True, seed=seed)
        elif isinstance(guess, str) and guess not in ("random", "rademacher", "previous"):
            raise ConfigError(f"guess must be 'random', 'rademacher', 'local', 'previous', a Guess "
                              f"or a callable for training, got {guess!r}.")
        self.guess: Guess = guess if isinstance(guess, Guess) else resolve_guess(guess, None)
        device = next(model.parameters()).device
        self.generator = make_generator(seed, device)
        self.jvps = 0

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, indices: Any = None,
             epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on (inputs, targets); returns (loss, outputs), both detached."""
        objective = Objective(self.model, (inputs, targets), self.loss_fn, validate=False,
                              train_mode=self.model.training, batch_size=int(inputs.shape[0]))
        estimate = forward_gradient(objective, guess=self.guess, num_guesses=self.num_guesses,
                                    combine=self.combine, seed=self.generator,
                                    chunk_size=self.chunk_size)
        loss = torch.tensor(estimate.loss)
        check_finite(loss, epoch)
        with torch.no_grad():
            outputs = as_logits(self.model(inputs))
        for name, p in self.model.named_parameters():
            if name in estimate.estimate:
                p.grad = estimate.estimate[name].to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.jvps += estimate.num_jvps
        return loss, outputs.detach()

    def describe(self) -> dict:
        return {"rule": type(self).__name__, "optimizer": type(self.optimizer).__name__,
                "base": self.base, "num_guesses": self.num_guesses, "combine": self.combine,
                "jvps": self.jvps, **self.guess.describe()}


@register_training_method("forward")
def forward_method(ctx: MethodContext, *, base: str = "sgd", guess: str = "random",
                   num_guesses: int = 1, combine: str = "mean",
                   blocks: int | Sequence[int] | None = None, head: str = "linear",
                   head_lr: float = 1e-3, chunk_size: int | None = None) -> ForwardGradientSGD:
    """``train(..., gradient="forward", optimizer=base, guess=..., ...)``."""
    return ForwardGradientSGD(ctx.model, lr=ctx.lr, momentum=ctx.momentum,
                              weight_decay=ctx.weight_decay, base=base, guess=guess,
                              num_guesses=num_guesses, combine=combine, loss=ctx.loss_fn,
                              seed=ctx.seed, blocks=blocks, head=head, head_lr=head_lr,
                              chunk_size=chunk_size)
