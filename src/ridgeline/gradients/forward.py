"""Forward gradients: gradient estimates from directional derivatives (forward mode only).

For a guess direction v, the directional derivative d = ∇L(θ)·v is one Jacobian-vector
product of the loss, ``torch.func.jvp`` — a forward pass carrying a tangent, no backward
pass and no stored graph. Several guesses are evaluated at once with ``vmap`` over the
tangents, and dataset means are exact and all-reduced through ``Objective.batch_mean``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jvp, vmap

from ridgeline.errors import (
    ArchitectureMismatchError,
    ConfigError,
    NonFiniteLossError,
    UnsupportedOperationError,
)
from ridgeline.gradients.guesses import GuessBatch, generator_for, stack_guess
from ridgeline.gradients.resolve import resolve_guess
from ridgeline.objective import Objective, as_objective
from ridgeline.params import Params

__all__ = ["ForwardGradient", "forward_gradient", "directional_derivatives", "combine_estimate",
           "layer_of", "check_num_guesses", "COMBINE"]

COMBINE = ("mean", "span")


def layer_of(name: str) -> str:
    """The module a parameter belongs to: ``"3.weight"`` → ``"3"``."""
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass(frozen=True)
class ForwardGradient:
    """A forward-gradient estimate ĝ of ∇L and what it was built from.

    Attributes
    ----------
    estimate : dict name -> tensor
        ĝ, shaped like the parameters.
    directional_derivatives : tensor (B, K)
        d_{b,k} = ∇_{θ_b}L · u_{b,k} for each block b (B = 1 unless the guess splits the
        parameters into blocks) and guess k.
    guesses : dict name -> tensor (K, *shape)
        The guess directions u_k.
    loss : float
        L(θ), the primal value of the forward passes.
    combine : {"mean", "span"}
    blocks : tuple of tuples of names
        The parameter blocks, each estimated from its own directional derivatives.
    unbiased : tuple of bool
        Per guess: estimated as d·v (random) or as the projection d/‖u‖²·u (informed).
    notes : tuple of str
        E.g. that attention ran on the MATH backend of ``scaled_dot_product_attention``
        (the fused kernels have no forward-mode rule).
    """

    estimate: Params
    directional_derivatives: torch.Tensor
    guesses: Params
    loss: float = math.nan
    combine: str = "mean"
    blocks: tuple[tuple[str, ...], ...] = ()
    unbiased: tuple[bool, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def num_guesses(self) -> int:
        return int(self.directional_derivatives.shape[-1])

    @property
    def num_jvps(self) -> int:
        """Jacobian-vector products evaluated (per batch): blocks × guesses."""
        return int(self.directional_derivatives.numel())

    def flat(self) -> torch.Tensor:
        """ĝ as one vector (parameter order)."""
        return torch.cat([t.reshape(-1) for t in self.estimate.values()])

    def layer_norms(self) -> dict[str, float]:
        """‖ĝ_ℓ‖ per layer (weights and bias of one module together)."""
        sums: dict[str, float] = {}
        for name, t in self.estimate.items():
            sums[layer_of(name)] = sums.get(layer_of(name), 0.0) + float(t.pow(2).sum())
        return {k: math.sqrt(v) for k, v in sums.items()}

    def to_dict(self) -> dict:
        return {"loss": self.loss, "combine": self.combine, "num_guesses": self.num_guesses,
                "num_blocks": len(self.blocks), "num_jvps": self.num_jvps,
                "directional_derivatives": self.directional_derivatives.detach().cpu().tolist(),
                "unbiased": list(self.unbiased), "notes": list(self.notes),
                "estimate_norm": float(self.flat().norm()), "layer_norms": self.layer_norms()}

    def plot(self, ax=None):
        """Bar chart of ‖ĝ‖ per layer; returns the Axes."""
        from ridgeline.plotting import new_axes

        ax = new_axes(ax, 5, 3.2)
        norms = self.layer_norms()
        ax.bar(range(len(norms)), list(norms.values()))
        ax.set_xticks(range(len(norms)), list(norms), rotation=45, ha="right")
        ax.set_ylabel("‖ĝ‖ per layer")
        ax.set_title(f"forward gradient ({self.num_guesses} guesses, {self.combine})")
        return ax


def check_num_guesses(num_guesses: Any) -> int:
    if isinstance(num_guesses, bool) or not isinstance(num_guesses, int) or num_guesses < 1:
        raise ConfigError(f"num_guesses must be an integer ≥ 1, got {num_guesses!r}; each guess "
                          "costs one Jacobian-vector product (about two forward passes).")
    return num_guesses


# ----------------------------------------------------------------------------- errors
_FORWARD_AD_OP = re.compile(r"forward AD with (\S+?) that does not support it")
_BATCHING_OP = re.compile(r"[Bb]atching rule not implemented for (\S+)")


def _unsupported(exc: BaseException, model_name: str) -> UnsupportedOperationError | None:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if (m := _FORWARD_AD_OP.search(text)) is not None:
        op, why = m.group(1), "has no forward-mode (jvp) rule in PyTorch"
    elif "jvp function for custom autograd.Function" in text:
        op, why = "a custom torch.autograd.Function", "defines no jvp staticmethod"
    elif "setup_context" in text and "autograd.Function" in text:
        op, why = "a custom torch.autograd.Function", "has no setup_context (old-style Function)"
    elif (m := _BATCHING_OP.search(text)) is not None or ("vmap" in text and "jvp" not in text):
        op = m.group(1) if m else "an operation"
        return UnsupportedOperationError(
            f"the model {model_name} uses {op}, which cannot be batched with vmap over several "
            f"guesses ({first}). Pass chunk_size=1 to evaluate one guess at a time without vmap.")
    else:
        return None
    return UnsupportedOperationError(
        f"forward gradients need forward-mode differentiation (torch.func.jvp), but the model "
        f"{model_name} uses {op}, which {why}. Replace that operation with one that has a "
        "forward-mode rule (or wrap it in a torch.autograd.Function with a jvp staticmethod), "
        "or fall back to backprop: Objective.grad() / ridgeline.train(..., gradient='backprop'). "
        f"PyTorch said: {first}")


@contextlib.contextmanager
def forward_mode_errors(model: Any) -> Iterator[None]:
    """Turn PyTorch's 'no forward-mode rule' failures into UnsupportedOperationError."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        if isinstance(exc, UnsupportedOperationError):
            raise
        translated = _unsupported(exc, type(model).__name__)
        if translated is None:
            raise
        raise translated from exc


# ----------------------------------------------------------------------------- jvp
def directional_derivatives(objective: Objective, params: Mapping[str, torch.Tensor],
                            tangents: Mapping[str, torch.Tensor], *,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(θ), [∇L(θ)·t_q]_q) for tangents stacked along a leading axis, by forward mode.

    One ``torch.func.jvp`` of the batch loss per tangent, batched with ``vmap`` (in chunks of
    ``chunk_size`` tangents; ``chunk_size=1`` runs them one by one without vmap), under
    ``torch.no_grad``: no backward pass and no graph. Batches are combined exactly by
    ``Objective.batch_mean`` (all-reduced under torch.distributed). Attention runs on the
    MATH backend of ``scaled_dot_product_attention`` (``Objective.differentiable_attention``).
    """
    params = dict(params)
    count = int(next(iter(tangents.values())).shape[0])

    def per_batch(x: torch.Tensor, y: torch.Tensor) -> dict:
        def one(tangent):
            return jvp(lambda p: objective.batch_loss(p, x, y), (params,), (tangent,))

        if chunk_size == 1:
            pairs = [one({k: t[q] for k, t in tangents.items()}) for q in range(count)]
            return {"loss": pairs[0][0], "d": torch.stack([d for _, d in pairs])}
        values, derivs = vmap(one, chunk_size=chunk_size)(dict(tangents))
        return {"loss": values.reshape(-1)[0], "d": derivs}

    def check(value: dict, batch: Any) -> None:
        if not bool(torch.isfinite(value["loss"])) or not bool(torch.isfinite(value["d"]).all()):
            raise NonFiniteLossError(
                f"the loss or its directional derivative is not finite on batch {batch.index} "
                f"(loss {float(value['loss'])}); check that batch's inputs and the parameters "
                "for NaN/inf, and when training lower the learning rate (random-guess "
                "estimates are about √P times longer than the gradient).")

    with torch.no_grad(), forward_mode_errors(objective.model), \
            objective.differentiable_attention():
        out = objective.batch_mean(per_batch, check=check)
    return out["loss"], out["d"]


def _check_blocks(blocks: Sequence[Sequence[str]] | None, params: Mapping[str, torch.Tensor]
                  ) -> tuple[tuple[str, ...], ...]:
    if blocks is None:
        return (tuple(params),)
    blocks = tuple(tuple(b) for b in blocks)
    seen = [n for b in blocks for n in b]
    missing = [n for n in params if n not in seen]
    unknown = [n for n in seen if n not in params]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if missing or unknown or repeated or any(not b for b in blocks):
        raise ArchitectureMismatchError(
            f"the guess's blocks must partition the parameters: missing {missing[:5]}, unknown "
            f"{unknown[:5]}, repeated {repeated[:5]}, empty blocks "
            f"{sum(1 for b in blocks if not b)}. List every parameter name in exactly one block.")
    return blocks


def block_tangents(directions: Mapping[str, torch.Tensor],
                   blocks: tuple[tuple[str, ...], ...]) -> Params:
    """Tangents (B·K, *shape): guess k restricted to block b at row b·K + k."""
    if len(blocks) == 1:
        return dict(directions)
    out = {}
    for b, names in enumerate(blocks):
        for name in names:
            u = directions[name]
            t = u.new_zeros((len(blocks), *u.shape))
            t[b] = u
            out[name] = t.reshape(-1, *u.shape[1:])
    return {name: out[name] for name in directions}


def combine_estimate(directions: Mapping[str, torch.Tensor], unbiased: torch.Tensor,
                     blocks: tuple[tuple[str, ...], ...], derivs: torch.Tensor,
                     combine: str = "mean") -> Params:
    """ĝ from guesses u_k and directional derivatives d_{b,k} = ∇_{θ_b}L·u_{b,k}.

    Per block b:

    * ``"mean"``: ĝ_b = (1/K) Σ_k c_k u_{b,k} with c_k = d_{b,k} for random guesses
      (E[v vᵀ] = I, unbiased) and c_k = d_{b,k}/‖u_{b,k}‖² for informed guesses (the
      projection of ∇_{θ_b}L on u_{b,k}).
    * ``"span"``: ĝ_b = U_b G_b⁺ d_b with the Gram matrix G_b = U_bᵀU_b, i.e. the
      orthogonal projection of ∇_{θ_b}L onto span(u_{b,1..K}) (least squares; the
      directional derivatives are exactly U_bᵀ∇_{θ_b}L).
    """
    k = int(unbiased.shape[0])
    block_of = {name: b for b, names in enumerate(blocks) for name in names}
    first = next(iter(directions.values()))
    if combine == "span":
        gram = first.new_zeros((len(blocks), k, k))
        for name, u in directions.items():
            flat = u.reshape(k, -1)
            gram[block_of[name]] += flat @ flat.T
        coef = (torch.linalg.pinv(gram, hermitian=True) @ derivs[..., None])[..., 0]
    else:
        sq = first.new_zeros((len(blocks), k))
        for name, u in directions.items():
            sq[block_of[name]] += u.reshape(k, -1).pow(2).sum(-1)
        informed = torch.where(sq > 0, derivs / torch.where(sq > 0, sq, 1), 0)
        coef = torch.where(unbiased.to(derivs.device), derivs, informed) / k
    return {name: torch.tensordot(coef[block_of[name]], u, dims=1)
            for name, u in directions.items()}


def _validated(batch: GuessBatch, params: Params) -> GuessBatch:
    directions = stack_guess(batch.directions, params)
    k = next(iter(directions.values())).shape[0]
    if batch.unbiased.shape != (k,):
        raise ConfigError(f"the guess returned {k} directions but {batch.unbiased.numel()} "
                          "'unbiased' flags; give one flag per direction.")
    return GuessBatch(directions, batch.unbiased, batch.blocks)


def forward_gradient(model_or_objective: Any, data: Any = None, *, guess: Any = "random",
                     num_guesses: int = 1, combine: str = "mean",
                     seed: int | torch.Generator | None = 0, loss: Any = "cross_entropy",
                     chunk_size: int | None = None) -> ForwardGradient:
    """Estimate ∇L(θ) from directional derivatives taken in forward mode.

    For guesses u_1 … u_K the directional derivatives d_k = ∇L·u_k come from
    ``torch.func.jvp`` of the dataset loss (no backward pass). Then, per parameter block,

    * random v ~ N(0, I) or Rademacher: ĝ = d v, unbiased since E[v vᵀ] = I;
    * informed u (a local-loss gradient, the previous estimate, a given tensor):
      ĝ = (d/‖u‖²) u, the projection of ∇L on u;
    * K guesses: their mean (``combine="mean"``), or the projection of ∇L onto
      span(u_1..u_K), ĝ = U (UᵀU)⁺ d (``combine="span"``; from Uᵀ∇L = d, no gradient needed).

    Parameters
    ----------
    model_or_objective : nn.Module or Objective
    data : (inputs, targets), Dataset or DataLoader; omit when passing an Objective.
    guess : {"random", "rademacher", "local", "previous"}, Guess, callable or dict
        ``"local"`` builds a :class:`~ridgeline.gradients.LocalGuess` and fits its
        auxiliary heads on the data first (pass a fitted LocalGuess to reuse one).
        A dict holds one tensor per parameter (optionally with a leading axis of K
        guesses); a callable ``fn(objective, params) -> dict`` is called for the guess.
        Dicts and callables are informed guesses (projection).
    num_guesses : int
        K, random directions per estimate (≥ 1).
    combine : {"mean", "span"}
    seed : int, Generator or None
    loss : {"cross_entropy", "mse"} or callable
    chunk_size : int, optional
        Guesses per vmapped batch of jvps (memory: chunk_size forward passes at once);
        ``1`` evaluates them one by one without vmap.

    Returns
    -------
    ForwardGradient
        estimate, directional_derivatives (B, K), guesses (K, …), loss.

    Raises
    ------
    UnsupportedOperationError
        When the model uses an operation with no forward-mode rule (named in the message).

    References
    ----------
    Baydin, Pearlmutter, Syme, Wood & Torr (2022), "Gradients without backpropagation";
    Fournier, Rivaud, Belilovsky, Eickenberg & Oyallon (2023), "Can forward gradient match
    backpropagation?".
    """
    num_guesses = check_num_guesses(num_guesses)
    if combine not in COMBINE:
        raise ConfigError(f"combine must be 'mean' or 'span', got {combine!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    objective = as_objective(model_or_objective, data, loss=loss)
    params = objective.params()
    strategy = resolve_guess(guess, objective)
    batch = _validated(strategy(objective, params, num_guesses=num_guesses,
                                generator=generator_for(seed, params)), params)
    blocks = _check_blocks(batch.blocks, params)
    tangents = block_tangents(batch.directions, blocks)
    value, derivs = directional_derivatives(objective, params, tangents, chunk_size=chunk_size)
    derivs = derivs.reshape(len(blocks), batch.num_guesses)
    estimate = combine_estimate(batch.directions, batch.unbiased, blocks, derivs, combine)
    strategy.observe(estimate)
    return ForwardGradient(estimate, derivs, batch.directions, float(value), combine, blocks,
                           tuple(bool(u) for u in batch.unbiased.tolist()),
                           objective.attention_notes)
