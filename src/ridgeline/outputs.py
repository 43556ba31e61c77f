"""What ridgeline takes as a model's output, and how attention is differentiated.

**The one rule** (:func:`as_logits`, applied wherever ridgeline calls a model):

* a tensor is the output;
* a mapping — a ``dict`` or a Hugging Face ``ModelOutput`` (an ordered dict) — gives its
  ``"logits"`` entry; a mapping without one is refused (ridgeline never guesses which
  hidden state is meant);
* a tuple or list gives its first element (reduced by the same rule): Hugging Face models
  called with ``return_dict=False`` and no labels put the logits first.

So ``GPT2LMHeadModel`` gives (N, T, V) token logits, ``BertForSequenceClassification`` and
``ViTForImageClassification`` give (N, C) logits, and a plain ``nn.Module`` is unchanged.

**Attention.** PyTorch's fused ``F.scaled_dot_product_attention`` kernels (flash and
memory-efficient) have a first derivative but no forward-mode rule and no derivative of
their backward, and ``vmap`` has no batching rule for them (it falls back to a slow
loop). Work that needs any of these — Hessian and GGN products, Fisher products (forward
mode), jvps, the empirical NTK (per-example Jacobians and NTK-vector products) and
forward gradients — runs under :func:`differentiable_attention`, which selects the MATH
backend (plain matmul and softmax, whose derivatives of every order exist) only for
models that call ``scaled_dot_product_attention``; results then carry
:data:`ATTENTION_NOTE` in their notes. First-order work (losses, gradients, training,
paths) keeps the default backends. Dropout is off in eval mode (the default of every
``Objective``), so attention dropout is too.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ridgeline.errors import ShapeMismatchError

__all__ = ["as_logits", "uses_attention", "model_uses_attention", "remember_attention",
           "AttentionRecorder", "differentiable_attention", "ATTENTION_NOTE"]

#: the note results carry when attention products ran on the MATH backend
ATTENTION_NOTE = ("model calls F.scaled_dot_product_attention: products that need forward "
                  "mode, a second derivative or a per-example vmap ran on its MATH backend "
                  "(torch.nn.attention.sdpa_kernel(SDPBackend.MATH)); the fused kernels "
                  "support none of these.")


def as_logits(output: Any) -> torch.Tensor:
    """A model's output reduced to its logits (see the module docstring for the rule).

    Parameters
    ----------
    output : Tensor, dict / ModelOutput with ``"logits"``, or tuple / list

    Returns
    -------
    Tensor

    Raises
    ------
    ShapeMismatchError
        For a mapping without ``"logits"``, an empty tuple, or any other type.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], torch.Tensor):
            return output["logits"]
        keys = list(output.keys())
        raise ShapeMismatchError(
            f"the model returned a {type(output).__name__} with keys {keys} but no 'logits'; "
            "ridgeline takes the 'logits' entry of a dict or ModelOutput. Wrap the model in an "
            "nn.Module whose forward returns the tensor to measure (for a Hugging Face base "
            "model, use the class with a head, e.g. ...ForSequenceClassification).")
    if isinstance(output, (tuple, list)):
        if not output:
            raise ShapeMismatchError("the model returned an empty tuple; return the logits "
                                     "tensor (or a tuple whose first element is the logits).")
        return as_logits(output[0])
    raise ShapeMismatchError(
        f"the model returned a {type(output).__name__}; ridgeline needs a tensor, a dict or "
        "ModelOutput with 'logits', or a tuple whose first element is the logits.")


class AttentionRecorder(TorchFunctionMode):
    """A context that records (in ``seen``) whether ``F.scaled_dot_product_attention`` was
    called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen = True
        return func(*args, **(kwargs or {}))


def uses_attention(run: Callable[[], Any]) -> bool:
    """Whether calling ``run()`` (one forward pass, run here without gradients) calls
    ``F.scaled_dot_product_attention``."""
    with torch.no_grad(), AttentionRecorder() as recorder:
        run()
    return recorder.seen


#: what the probes found, per model (a weak reference: forgotten with the model)
_KNOWN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_uses_attention(model: Any, run: Callable[[], Any] | None = None) -> bool | None:
    """Whether ``model`` calls ``F.scaled_dot_product_attention``: remembered from an earlier
    probe of the same model object, else found by ``run()`` (one forward pass; ``None``
    when there is no ``run`` and nothing is known)."""
    try:
        if model in _KNOWN:
            return _KNOWN[model]
    except TypeError:  # not weak-referenceable
        return uses_attention(run) if run is not None else None
    if run is None:
        return None
    return remember_attention(model, uses_attention(run))


def remember_attention(model: Any, seen: bool) -> bool:
    """Record what a probe of ``model`` found (see :func:`model_uses_attention`)."""
    try:
        _KNOWN[model] = bool(seen)
    except TypeError:  # pragma: no cover - not weak-referenceable
        pass
    return bool(seen)


@contextlib.contextmanager
def differentiable_attention(active: bool = True) -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` uses its MATH backend (when
    ``active``), so forward-mode and second derivatives through it exist."""
    if not active:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
