"""Objective: a model, a loss and a dataset as a pure function of the parameters.

Every instrument is a few function transforms over :meth:`Objective.batch_loss` and
:meth:`Objective.batch_mean`; none of them touches data loading or module internals again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp
from torch.utils._pytree import tree_map

from ridgeline import distributed
from ridgeline.data.dataset import Dataset
from ridgeline.errors import DataError, NonFiniteLossError, ShapeMismatchError
from ridgeline.losses import (
    IGNORE_INDEX,
    LossFn,
    accuracy,
    loss_weight,
    resolve_loss,
    target_shape_error,
)
from ridgeline.outputs import (
    ATTENTION_NOTE,
    as_logits,
    differentiable_attention,
    model_uses_attention,
    remember_attention,
    uses_attention,
)
from ridgeline.params import Params, functional_call, named_buffers, named_parameters, unflatten

__all__ = ["Objective", "as_objective", "Batch", "DEFAULT_BATCH_SIZE"]

#: examples per batch when ``batch_size=None`` and the data is larger than that
DEFAULT_BATCH_SIZE = 4096


@dataclass(frozen=True)
class Batch:
    """One batch: inputs, targets, its position in the dataset, and its weight.

    ``weight`` is the number of terms the batch's loss averages: its examples, or for
    token targets under cross-entropy the tokens that count (targets ≠ −100).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    index: int
    start: int
    weight: int

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


@contextlib.contextmanager
def module_mode(model: nn.Module, train: bool):
    """Set every submodule's train/eval flag for the duration, then restore each one."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Objective:
    """The mean loss L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i) of a model over a dataset.

    The model is evaluated with ``torch.func.functional_call`` on a parameter dict, so
    L, ∇L and Hessian-vector products are pure functions of θ. Dataset means are exact:
    each batch mean is weighted by the number of terms it averages — its size, or for
    token targets the tokens that count (:func:`ridgeline.losses.loss_weight`) — so an
    uneven last batch or padding does not bias them. Buffers (BatchNorm running
    statistics) are carried along and never updated.

    The model's output is reduced to its logits by :func:`ridgeline.outputs.as_logits`
    (a Hugging Face ``ModelOutput`` or dict gives ``logits``, a tuple its first element),
    so ``Objective(GPT2LMHeadModel(config), (tokens, next_tokens))`` is the mean token
    cross-entropy.

    Parameters
    ----------
    model : nn.Module
    data : (inputs, targets), ridgeline Dataset, DataLoader, or iterable of batches
        Targets are (N,) class indices, (N, T) token indices (−100 ignored), or floats.
    loss : {"cross_entropy", "mse"} or callable (outputs, targets) -> scalar batch mean
        A callable's batches are weighted by their number of examples.
    batch_size : int, optional
        Examples per evaluation batch for tensor data; ``None`` uses the whole dataset in
        one batch up to :data:`DEFAULT_BATCH_SIZE` examples. Ignored for DataLoaders.
    train_mode : bool
        Evaluate the model in train mode (BatchNorm uses batch statistics, Dropout is
        active). Default eval mode, so the objective is a deterministic function of θ.
    validate : bool
        Check the data (finite inputs, label range, shapes) and probe the model on two
        examples before any expensive work.

    Notes
    -----
    Under ``torch.distributed`` (launched by ``torchrun``) each process evaluates every
    ``world_size``-th batch and losses, gradients and HVPs are all-reduced, so every rank
    holds the single-process value. A single process needs no setup.
    """

    def __init__(self, model: nn.Module, data: Any, loss: str | LossFn = "cross_entropy", *,
                 batch_size: int | None = None, train_mode: bool = False,
                 validate: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.loss_name, self.loss_fn = resolve_loss(loss)
        self.train_mode = bool(train_mode)
        self.batch_size = batch_size
        if batch_size is not None and batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}.")
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._attention: bool | None = None
        self._loader: Iterable | None = None
        self.num_classes: int | None = None
        if isinstance(data, Dataset):
            self._tensors, self.num_classes = data.as_tuple(), data.num_classes
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
                isinstance(t, torch.Tensor) for t in data):
            self._tensors = (data[0], data[1])
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
            self._loader = data
        else:
            raise DataError(
                f"data must be an (inputs, targets) tuple of tensors, a ridgeline Dataset, a "
                f"DataLoader or an iterable of (inputs, targets) batches; got {type(data).__name__}.")
        if self._tensors is not None:
            inputs, targets = self._tensors
            if inputs.shape[0] != targets.shape[0]:
                raise DataError(f"data has {inputs.shape[0]} inputs but {targets.shape[0]} "
                                "targets; both need one row per example.")
            if inputs.shape[0] == 0:
                raise DataError("data is empty: it needs at least one example.")
        if validate:
            self._validate()
        if distributed.is_distributed():
            self._check_same_data_on_every_rank()

    # ----------------------------------------------------------------- parameters
    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def params(self) -> Params:
        """The model's trainable parameters (detached), by name."""
        return named_parameters(self.model)

    def buffers(self) -> Params:
        return named_buffers(self.model)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params().values())

    # ----------------------------------------------------------------- data
    @property
    def num_examples(self) -> int:
        """N, the number of examples in the whole dataset (all processes together)."""
        if self._tensors is not None:
            return int(self._tensors[0].shape[0])
        if not hasattr(self, "_loader_size"):
            self._loader_size = sum(int(x.shape[0]) for x, _ in self._iterate_all())
        return self._loader_size

    def _iterate_all(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._tensors is not None:
            inputs, targets = self._tensors
            n = inputs.shape[0]
            size = self.batch_size or (n if n <= DEFAULT_BATCH_SIZE else DEFAULT_BATCH_SIZE)
            for start in range(0, n, size):
                yield inputs[start:start + size], targets[start:start + size]
        else:
            for item in self._loader:  # type: ignore[union-attr]
                if not isinstance(item, (tuple, list)) or len(item) < 2:
                    raise DataError("each batch of the data loader must be (inputs, targets, ...); "
                                    f"got {type(item).__name__}.")
                yield item[0], item[1]

    @property
    def fixed_batches(self) -> bool:
        """Whether every pass over the data gives the same batches (tensor data; a data
        loader may shuffle)."""
        return self._tensors is not None

    def per_batch(self, *, shard: bool = True) -> Iterator[Batch]:
        """The batches this process evaluates, moved to the model's device and dtype.

        Under torch.distributed batches are dealt round-robin over processes; with
        ``shard=False`` every batch is returned.
        """
        world, me = (distributed.world_size(), distributed.rank()) if shard else (1, 0)
        start = 0
        for index, (inputs, targets) in enumerate(self._iterate_all()):
            size = int(inputs.shape[0])
            if index % world == me:
                yield Batch(self._prepare_inputs(inputs), targets.to(self.device), index, start,
                            loss_weight(self.loss_fn, targets))
            start += size

    def _prepare_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device)
        if inputs.is_floating_point() and inputs.dtype != self.dtype:
            inputs = inputs.to(self.dtype)
        return inputs

    # ----------------------------------------------------------------- pure functions
    def forward(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                buffers: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """f(x; θ) through ``functional_call``; buffers are copied in train mode so the
        model's running statistics never change."""
        buffers = self.buffers() if buffers is None else buffers
        if self.train_mode:
            buffers = {k: v.clone() for k, v in buffers.items()}
        with module_mode(self.model, self.train_mode):
            return as_logits(functional_call(self.model, ({**params}, {**buffers}), (inputs,),
                                             strict=False))

    def batch_loss(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of one batch, a pure function of ``params`` (for ``torch.func``)."""
        return self.loss_fn(self.forward(params, inputs), targets)

    def batch_mean(self, fn: Callable[..., Any], *,
                   check: Callable[[Any, Batch], None] | None = None,
                   indexed: bool = False) -> Any:
        """Σ_b (w_b / W) fn(x_b, y_b): the exact dataset mean of a per-batch mean.

        w_b is the batch's :attr:`Batch.weight` (its examples, or the tokens that count for
        token targets) and W = Σ_b w_b; a batch with no term (every token ignored) is
        skipped. ``fn`` returns a tensor or a pytree of tensors (a batch *mean*). The
        result is all-reduced over processes. ``check(value, batch)`` may inspect each
        batch's value. With ``indexed`` ``fn`` is called as fn(x_b, y_b, b), b the batch's
        :attr:`Batch.index` (for per-batch caches).
        """
        total, count = None, 0
        for batch in self.per_batch():
            if batch.weight == 0:
                continue
            value = fn(batch.inputs, batch.targets, *((batch.index,) if indexed else ()))
            if check is not None:
                check(value, batch)
            weighted = tree_map(lambda t, n=batch.weight: t * n, value)
            total = weighted if total is None else tree_map(torch.add, total, weighted)
            count += batch.weight
        if total is None:  # this rank got no batch (or none with a term)
            # it still joins the all-reduce, with zeros shaped like fn's value. Evaluate fn on
            # a whole batch, never a slice of it: BatchNorm in train mode refuses a batch of
            # one, and fn must see the batch it was written for (the other ranks are busy with
            # theirs, so this costs no wall-clock time)
            probe = next(b for b in self.per_batch(shard=False) if b.weight > 0)
            total = tree_map(torch.zeros_like, fn(probe.inputs, probe.targets,
                                                  *((probe.index,) if indexed else ())))
        if distributed.is_distributed():
            total = distributed.all_reduce_tree(total)
            count = int(distributed.all_reduce_sum(torch.tensor(float(count))).item())
        return tree_map(lambda t: t / count, total)

    def _check_loss(self, loss: torch.Tensor, batch: Batch) -> None:
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLossError(
                f"the loss is {loss.item()} on batch {batch.index} (examples {batch.start}–"
                f"{batch.start + batch.size - 1}). Check the inputs of that batch for NaN/inf, "
                "lower the learning rate, or inspect the parameters for non-finite values.")

    # ----------------------------------------------------------------- quantities
    def _params_or_current(self, params: Mapping[str, torch.Tensor] | None) -> Params:
        return self.params() if params is None else dict(params)

    def loss(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """L(θ), the exact mean loss over the dataset (a 0-dim tensor)."""
        params = self._params_or_current(params)
        with torch.no_grad():
            return self.batch_mean(lambda x, y: self.batch_loss(params, x, y),
                                   check=self._check_loss)

    def grad(self, params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """∇L(θ), by name."""
        return self.loss_and_grad(params)[1]

    def loss_and_grad(self, params: Mapping[str, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, Params]:
        """(L(θ), ∇L(θ)) in one pass over the data."""
        params = self._params_or_current(params)
        names = list(params)

        def both(x, y):
            # plain reverse mode on leaf copies: cheaper than a torch.func transform here
            leaves = {k: params[k].detach().requires_grad_(True) for k in names}
            with torch.enable_grad():
                value = self.batch_loss(leaves, x, y)
                grads = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
            return {"loss": value.detach(),
                    "grad": {k: torch.zeros_like(leaves[k]) if g is None else g
                             for k, g in zip(names, grads)}}

        out = self.batch_mean(both, check=lambda v, b: self._check_loss(v["loss"], b))
        return out["loss"], out["grad"]

    def hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
            ) -> Params:
        """H v with H = ∇²L(θ), by forward-over-reverse differentiation
        (``jvp`` of ``grad``), summed over batches with their weights (attention on its
        MATH backend, see :meth:`differentiable_attention`).

        ``v`` is a dict of tensors by parameter name (shaped like the parameters) or one
        flat vector of length P; anything else raises ShapeMismatchError before any work."""
        params = self._params_or_current(params)
        tangent = self._tangent(v, params)
        batch_grad = grad(self.batch_loss)

        def product(x, y):
            _, hv = jvp(lambda p: batch_grad(p, x, y), (params,), (tangent,))
            return {k: t.detach() for k, t in hv.items()}

        with self.differentiable_attention():
            return self.batch_mean(product)

    # ----------------------------------------------------------------- attention
    @property
    def uses_attention(self) -> bool:
        """Whether the model calls ``F.scaled_dot_product_attention`` (seen in the probe
        forward pass of validation, or in one probe on two examples)."""
        if self._attention is None:
            def probe() -> Any:
                batch = next(self.per_batch(shard=False))
                return self.forward(self.params(), batch.inputs[:2])

            self._attention = model_uses_attention(self.model, probe)
        return bool(self._attention)

    def differentiable_attention(self) -> contextlib.AbstractContextManager:
        """A context for forward-mode and second-order work: for a model that calls
        ``F.scaled_dot_product_attention``, its MATH backend (whose derivatives of every
        order exist; the fused kernels have neither forward mode nor a double backward);
        otherwise nothing changes. See :mod:`ridgeline.outputs`."""
        return differentiable_attention(self.uses_attention)

    @property
    def attention_notes(self) -> tuple[str, ...]:
        """The note results carry when :meth:`differentiable_attention` changed the backend."""
        return (ATTENTION_NOTE,) if self.uses_attention else ()

    def _tangent(self, v: Mapping[str, torch.Tensor] | torch.Tensor,
                 params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``v`` as tensors shaped like ``params``: a dict by name, or one flat vector of
        length P (in parameter order); anything else raises ShapeMismatchError."""
        sizes = {k: p.numel() for k, p in params.items()}
        total = sum(sizes.values())
        if isinstance(v, torch.Tensor):
            if v.dim() != 1 or v.numel() != total:
                raise ShapeMismatchError(
                    f"hvp got a tensor of shape {tuple(v.shape)}; pass a flat vector of length "
                    f"{total} (the trainable parameters) or a dict of tensors by parameter name.")
            return unflatten(v.to(self.dtype), dict(params))
        if not isinstance(v, Mapping):
            raise ShapeMismatchError(f"hvp takes a dict of tensors by parameter name or a flat "
                                     f"vector of length {total}; got {type(v).__name__}.")
        missing = [k for k in params if k not in v]
        wrong = [f"'{k}' has shape {tuple(v[k].shape)}, expected {tuple(p.shape)}"
                 for k, p in params.items() if k in v and tuple(v[k].shape) != tuple(p.shape)]
        if missing or wrong:
            problems = ([f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}"]
                        if missing else []) + wrong[:5]
            raise ShapeMismatchError("hvp's vector does not match the parameters: "
                                     + "; ".join(problems) + ". Build it with "
                                     "ridgeline.random_direction or unflatten a vector of length "
                                     f"{total}.")
        return {k: v[k] for k in params}

    def outputs(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """f(X; θ) for every example, in dataset order (all batches, not sharded)."""
        params = self._params_or_current(params)
        with torch.no_grad():
            return torch.cat([self.forward(params, b.inputs) for b in self.per_batch(shard=False)])

    def loss_and_accuracy(self, params: Mapping[str, torch.Tensor] | None = None
                          ) -> tuple[float, float | None]:
        """(L(θ), accuracy) in one pass; accuracy is ``None`` for regression targets.

        Accuracy is per example, or per token that counts for token targets (the same
        terms, and batch weights, as the loss)."""
        params = self._params_or_current(params)
        classification = self.is_classification

        def both(x, y):
            out = self.forward(params, x)
            loss = self.loss_fn(out, y)
            acc = accuracy(out, y) if classification else loss * 0
            return {"loss": loss, "accuracy": acc}

        with torch.no_grad():
            values = self.batch_mean(both, check=lambda v, b: self._check_loss(v["loss"], b))
        return float(values["loss"]), (float(values["accuracy"]) if classification else None)

    @property
    def is_classification(self) -> bool:
        if self._tensors is not None:
            return not self._tensors[1].is_floating_point()
        return self.num_classes is not None or not next(self._iterate_all())[1].is_floating_point()

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        if self._tensors is not None:
            inputs, targets = self._tensors
            if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
                bad = (~torch.isfinite(inputs.reshape(inputs.shape[0], -1))).any(dim=1).nonzero()
                raise DataError(f"inputs contain NaN or inf in {bad.numel()} examples (first at "
                                f"index {bad[0].item()}); clean or drop them before measuring.")
            probe_x, probe_y = inputs[:2], targets[:2]
        else:
            probe_x, probe_y = next(iter(self._iterate_all()))
            probe_x, probe_y = probe_x[:2], probe_y[:2]
            targets = None
        outputs: list[torch.Tensor] = []
        try:
            self._attention = remember_attention(self.model, uses_attention(lambda: outputs.append(
                self.forward(self.params(), self._prepare_inputs(probe_x)))))
            out = outputs[0]
        except ShapeMismatchError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ShapeMismatchError(
                f"the model cannot be applied to inputs of shape {tuple(probe_x.shape[1:])} per "
                f"example: {exc}. Check that the data matches the model's input size.") from exc
        if self.loss_name == "cross_entropy":
            if probe_y.is_floating_point():
                raise DataError("cross_entropy needs integer class labels; got float targets. "
                                "Use loss='mse' for regression targets.")
            whole = targets if targets is not None else probe_y
            error = target_shape_error((whole.shape[0], *out.shape[1:]), tuple(whole.shape))
            if error is not None:
                raise error
            classes = out.shape[-1]
            labels = targets if targets is not None else probe_y
            labels = labels[labels != IGNORE_INDEX]
            if labels.numel() == 0 and targets is not None:
                raise DataError("every target is -100 (ignored), so the loss has no term; "
                                "pass targets with at least one class index.")
            low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
            if low < 0 or high >= classes:
                raise DataError(f"labels range over [{low}, {high}] but the model has {classes} "
                                f"outputs; labels must lie in [0, {classes - 1}] (or be -100, "
                                "ignored).")
        if self.train_mode and _has_batchnorm(self.model) and probe_x.shape[0] < 2:
            raise DataError("BatchNorm in train mode needs batches of at least 2 examples.")
        with torch.no_grad():
            value = self.loss_fn(out, self._targets_to_device(probe_y))
        if self.loss_name == "cross_entropy" and loss_weight(self.loss_fn, probe_y) == 0:
            return  # the probe's targets are all ignored: its mean is NaN by definition
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ShapeMismatchError(
                f"the loss must return a scalar (the batch mean), but it returned {shape}. "
                "Reduce it with .mean() over the batch.")

    def _check_same_data_on_every_rank(self) -> None:
        """Every process must hold the whole, identical dataset (each evaluates its share)."""
        distributed.check_consistent(self.num_examples, "the dataset size")
        if self._tensors is not None:
            inputs, targets = self._tensors
            checksum = float(inputs.double().sum()) + 1e-3 * float(targets.double().sum())
            distributed.check_consistent(checksum, "the dataset checksum")

    def _targets_to_device(self, targets: torch.Tensor) -> torch.Tensor:
        return targets.to(self.device)

    def __repr__(self) -> str:
        return (f"Objective(model={type(self.model).__name__}, loss={self.loss_name!r}, "
                f"examples={self.num_examples}, params={self.num_params}, "
                f"mode={'train' if self.train_mode else 'eval'})")


def as_objective(model_or_objective: nn.Module | Objective, data: Any = None, *,
                 loss: str | LossFn = "cross_entropy", **kwargs: Any) -> Objective:
    """Accept either an :class:`Objective` or ``(model, data, loss=...)``."""
    if isinstance(model_or_objective, Objective):
        if data is not None:
            raise DataError("pass data either inside the Objective or as `data`, not both.")
        return model_or_objective
    if data is None:
        raise DataError("data is required when passing a model; pass (inputs, targets), a "
                        "Dataset or a DataLoader, or pass an Objective instead of the model.")
    return Objective(model_or_objective, data, loss, **kwargs)
