"""SAF: sharpness-aware training for free, via a KL term against each example's past logits."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ridgeline.errors import ConfigError, DataError, ShapeMismatchError
from ridgeline.optim.schedule import KLStart

__all__ = ["TrajectoryLoss", "distillation_kl", "distillation_kl_gradient"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}


def _compute_dtype(outputs: torch.Tensor) -> torch.dtype:
    """The KL's dtype: the model's (its logits'), at least float32 (half-precision logits
    are promoted, float64 logits stay float64)."""
    return torch.promote_types(outputs.dtype, torch.float32)


class _SoftKL(torch.autograd.Function):
    """s · Σ_i m_i KL(softmax(t_i/τ) ‖ softmax(f_i/τ)) with its gradient in closed form,
    ∂/∂f_i = s m_i (softmax(f_i/τ) − softmax(t_i/τ)) / τ: one autograd node, few kernels,
    computed in the logits' dtype (at least float32).

    This term is the whole overhead of SAF, so its kernel count matters: student and
    teacher logits are stacked as (2, O, B) so that one scaling and one log-softmax serve
    both, and the softmax runs along the class axis of that layout (torch's CPU kernel over
    a short last axis is ≈4× slower for O ≈ 10).
    """

    @staticmethod
    def forward(ctx, outputs, teacher_logits, mask, scale, temperature):
        dtype = _compute_dtype(outputs)
        both = torch.stack((outputs.detach().to(dtype).t(), teacher_logits.to(dtype).t()))
        logs = F.log_softmax(both.mul_(1.0 / temperature), dim=1)
        probs = logs.exp()
        gap = logs[1] - logs[0]                    # log p − log q
        diff = (probs[0] - probs[1]).t().contiguous()   # q − p as (B, O), the gradient's direction
        if mask is not None:
            mask = mask.to(dtype)
            gap.mul_(mask)
            diff.mul_(mask.unsqueeze(-1))
        ctx.save_for_backward(diff)
        ctx.factor, ctx.dtype = scale / temperature, outputs.dtype
        return torch.vdot(probs[1].reshape(-1), gap.view(-1)) * scale

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return (diff * (grad * ctx.factor)).to(ctx.dtype), None, None, None, None


def distillation_kl_gradient(teacher_logits: torch.Tensor, outputs: torch.Tensor,
                             temperature: float, mask: torch.Tensor | None = None, *,
                             weight: float = 1.0) -> torch.Tensor:
    r"""∂/∂f of :func:`distillation_kl`, λ τ m_i (softmax(f_i/τ) − softmax(t_i/τ)) / B, as a
    plain (B, O) tensor in the dtype of ``outputs`` (no autograd graph, no KL value).

    Training only needs this gradient: ``torch.autograd.backward((loss, outputs), (None,
    g))`` adds it to the loss's own gradient without building or evaluating the KL, about
    half the kernels of the value-and-gradient node. Student and teacher logits are stacked
    as (2, O, B), one scaling and one softmax serve both, and the softmax runs along the
    class axis of that layout (torch's CPU softmax over a short last axis is ≈10× slower for
    O = 10).
    """
    dtype = _compute_dtype(outputs)
    student = outputs.detach()
    both = torch.stack((student.t(), teacher_logits.t()))   # (2, O, B), promoted
    if both.dtype != dtype:
        both = both.to(dtype)
    probs = torch.softmax(both.mul_(1.0 / temperature), dim=1)
    factor = weight * temperature / outputs.shape[0]
    if mask is not None:
        factor = mask.to(dtype) * factor
    grad = torch.sub(probs[0], probs[1]).mul_(factor).t()
    return grad if grad.dtype == outputs.dtype else grad.to(outputs.dtype)


def distillation_kl(teacher_logits: torch.Tensor, outputs: torch.Tensor, temperature: float,
                    mask: torch.Tensor | None = None, *, weight: float = 1.0) -> torch.Tensor:
    r"""λ τ² · (1/B) Σ_i m_i KL( softmax(t_i/τ) ‖ softmax(f_i/τ) ), gradient only through f.

    ``mask`` (B,) weights the examples (0 drops one); the mean is over all B examples. The
    gradient is the closed form λ τ m_i (softmax(f_i/τ) − softmax(t_i/τ)) / B. Computed in
    the dtype of ``outputs`` (half precision promoted to float32; float64 stays float64).
    """
    if mask is not None:
        mask = mask.to(outputs.device, _compute_dtype(outputs))
    scale = weight * temperature ** 2 / outputs.shape[0]
    return _SoftKL.apply(outputs, teacher_logits.detach(), mask, scale, float(temperature))


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ConfigError(f"dtype must be torch.float16, torch.bfloat16, torch.float32 or "
                          f"torch.float64, got {dtype}.")
    return dtype


class TrajectoryLoss:
    r"""SAF's trajectory loss: KL to the logits each example had ``lag`` epochs earlier.

    For a batch B of examples seen in epoch e with current logits f(x; θ_t),

    .. math:: \mathcal L_\text{tra} = λ τ^2 \frac1{|B|} \sum_{i∈B}
              \mathrm{KL}\big(\mathrm{softmax}(\hat y_{e-Ẽ}(x_i)/τ) \,\big\|\,
              \mathrm{softmax}(f(x_i;θ_t)/τ)\big),

    where ŷ_{e−Ẽ}(x_i) are the logits the network produced for x_i during epoch e − Ẽ
    (Ẽ = ``lag``). It penalises how fast the outputs move along the trajectory, which Du
    et al. show approximates SAM's sharpness term at no extra forward or backward pass.
    Logits are kept per example index in a ring buffer of Ẽ + 1 epoch slots, so memory is
    exactly (Ẽ + 1)·N·O values of ``dtype`` (a slot is filled with NaN when its epoch
    starts, which marks the examples not seen in it). The term is 0 up to and including
    epoch ``start_epoch`` (counted from 0, as the authors' code counts) and for examples
    without logits from epoch e − Ẽ (the first Ẽ epochs, or an example skipped by
    ``drop_last``); the mean is always over the whole batch. The KL is computed in the
    logits' dtype (float64 for a float64 model; half precision is promoted to float32).

    Parameters
    ----------
    num_examples : int
        N, the size of the training set; indices must lie in [0, N).
    num_outputs : int
        O, the number of logits per example.
    lag : int
        Ẽ ≥ 1 epochs (paper: 2–3).
    temperature : float
        τ > 0 (paper: 5).
    weight : float
        λ ≥ 0 (paper: 0.3).
    start_epoch : int
        The authors' ``kl_start_epoch`` (their default 5): the term is on in every epoch
        *after* it, counting epochs from 0 — ``epoch − first_epoch > start_epoch``, exactly
        their ``epoch > args.kl_start_epoch`` with 0-based epochs. With ridgeline's epochs
        (counted from 1) the first epoch with a term is ``start_epoch + 2``: 7 for the
        default 5, the 7th epoch of training in both codes (:attr:`first_active_epoch`).
    first_epoch : int
        The number the caller gives its first epoch: 1 for :func:`ridgeline.train` (and
        ``range(1, epochs + 1)``), 0 for a ``range(epochs)`` loop as in the authors' code.
    dtype : torch.float16, torch.bfloat16, torch.float32 or torch.float64
        Storage type of the buffer (half precision halves the memory; float64 keeps a
        float64 model's logits exactly).
    device : torch.device, optional
        Where the buffer lives; by default the device of the first logits it sees. It is
        allocated on the first call, not before.

    Notes
    -----
    Call ``loss_term = saf(outputs, indices, epoch)`` once per step with the batch's
    training-set indices (:class:`~ridgeline.optim.IndexedDataset` yields them) and add it
    to the loss. Epochs must not decrease, and every epoch must see the same number of
    examples (a changing loader length is an error: the stored logits would not line up).
    The KL and its gradient λτ(softmax(f/τ) − softmax(ŷ/τ))/B are one fused autograd node.

    References
    ----------
    Du, Zhou, Feng, Ong & Goh (2022), "Sharpness-Aware Training for Free", NeurIPS; their
    code, github.com/AngusDujw/SAF, ``SAF_train.py`` (``epoch > args.kl_start_epoch``).
    """

    def __init__(self, num_examples: int, num_outputs: int, *, lag: int = 3,
                 temperature: float = 5.0, weight: float = 0.3, start_epoch: int = 5,
                 dtype: torch.dtype | str = torch.float16,
                 device: torch.device | str | None = None, first_epoch: int = 1) -> None:
        if int(num_examples) < 1 or int(num_outputs) < 1:
            raise ConfigError(f"num_examples and num_outputs must be ≥ 1, got {num_examples} "
                              f"and {num_outputs}.")
        if int(lag) < 1:
            raise ConfigError(f"lag must be ≥ 1 epoch, got {lag}.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {temperature}.")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"weight must be ≥ 0, got {weight}.")
        self.num_examples, self.num_outputs = int(num_examples), int(num_outputs)
        self.lag, self.temperature, self.weight = int(lag), float(temperature), float(weight)
        self.start_epoch, self.first_epoch = int(start_epoch), int(first_epoch)
        self._start = KLStart(self.start_epoch, self.first_epoch)
        self.dtype = resolve_dtype(dtype)
        self.slots = self.lag + 1
        self._device = None if device is None else torch.device(device)
        self._remote = self._device is not None and self._device.type != "cpu"
        self._logits: torch.Tensor | None = None
        self._slot_views: tuple[torch.Tensor, ...] = ()
        self._workspace: dict = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # deferred writes
        self._pending_rows = 0
        self._flush_rows = max(1, min(2048, 2 ** 20 // self.num_outputs))
        self._slot_epoch: list[int | None] = [None] * self.slots
        self._complete: dict[int, bool] = {}  # epoch -> every example was seen in it
        self._epoch: int | None = None
        self._seen = 0
        self._epoch_sizes: list[int] = []

    @property
    def first_active_epoch(self) -> int:
        """The first epoch (in the caller's numbering) whose term can be non-zero:
        ``first_epoch + start_epoch + 1`` (7 for ridgeline's 1-based epochs and the default
        start_epoch = 5, the authors' 0-based epoch 6)."""
        return self._start.first_active_epoch

    # ------------------------------------------------------------------ memory
    @property
    def memory_bytes(self) -> int:
        """Bytes of the ring buffer: (lag+1)·N·O values of ``dtype``."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return self.slots * self.num_examples * self.num_outputs * item

    def _work(self, name: str, batch: int) -> torch.Tensor:
        """A (batch, O) tensor of the buffer's dtype and device kept between steps (a fresh
        small tensor per step costs as much as a kernel inside a training step)."""
        key = (name, batch)
        out = self._workspace.get(key)
        if out is None:
            if len(self._workspace) > 16:
                self._workspace.clear()
            out = self._workspace[key] = self._logits.new_empty(batch, self.num_outputs)
        return out

    def _allocate(self, device: torch.device) -> None:
        self._logits = torch.empty(self.slots, self.num_examples, self.num_outputs,
                                   dtype=self.dtype, device=self._device or device)
        self._slot_views = self._logits.unbind(0)  # per-step indexing without tensor views

    # ------------------------------------------------------------------ epochs
    def _advance(self, epoch: int) -> None:
        if self._epoch is not None and epoch < self._epoch:
            raise ConfigError(f"epoch went back from {self._epoch} to {epoch}; TrajectoryLoss "
                              "needs non-decreasing epochs (make a new one to restart training).")
        if self._epoch is not None and epoch == self._epoch:
            return
        self._flush()
        if self._epoch is not None:
            self._epoch_sizes.append(self._seen)
            if len(self._epoch_sizes) >= 2 and self._epoch_sizes[-1] != self._epoch_sizes[-2]:
                raise DataError(
                    f"epoch {self._epoch} had {self._epoch_sizes[-1]} examples but the epoch "
                    f"before had {self._epoch_sizes[-2]}: the data loader's length changed, "
                    "so stored logits no longer line up with examples. Keep the loader fixed "
                    "(same dataset, batch size and drop_last) for the whole run.")
            seen = self._logits[self._epoch % self.slots, :, 0]
            self._complete = {e: c for e, c in self._complete.items() if e > epoch - self.slots}
            self._complete[self._epoch] = not bool(seen.isnan().any())
        self._epoch, self._seen = epoch, 0
        self._slot_epoch[epoch % self.slots] = epoch
        self._logits[epoch % self.slots].fill_(math.nan)

    def _check(self, outputs: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            if indices is None:
                raise DataError("TrajectoryLoss needs the training-set index of every example in "
                                "the batch; wrap your dataset in ridgeline.optim.IndexedDataset (it "
                                "yields (x, y, index)) and pass the indices.")
            indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.is_floating_point():
            raise DataError(f"indices must be a 1-D integer tensor, got dtype {indices.dtype} and "
                            f"shape {tuple(indices.shape)}.")
        shape = outputs.shape
        if len(shape) != 2 or shape[0] != indices.shape[0] or shape[1] != self.num_outputs:
            raise ShapeMismatchError(
                f"outputs have shape {tuple(shape)} but TrajectoryLoss expects "
                f"({indices.shape[0]}, {self.num_outputs}) for a batch of {indices.shape[0]} "
                "indices; pass the logits (batch, num_outputs).")
        # on the CPU the index ops check bounds themselves (caught in exchange); elsewhere an
        # out-of-range index would be a device-side assert, so check first
        if not indices.is_cpu or self._remote:
            self._check_range(indices)
        return indices

    def _check_range(self, indices: torch.Tensor) -> None:
        if indices.numel():
            low, high = torch.aminmax(indices)
            low, high = int(low), int(high)
            if low < 0 or high >= self.num_examples:
                raise DataError(f"example index {high if high >= self.num_examples else low} is "
                                f"outside [0, {self.num_examples}): TrajectoryLoss was sized for "
                                f"{self.num_examples} examples. Build it with num_examples = the "
                                "training-set size.")

    # ------------------------------------------------------------------ the term
    def stored_logits(self, indices: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """The logits stored for ``indices`` in ``epoch`` (at least float32), or None if that epoch is
        no longer (or not yet) in the buffer or some of these examples were not seen in it."""
        self._flush()
        if self._logits is None or epoch < 0 or self._slot_epoch[epoch % self.slots] != epoch:
            return None
        indices = torch.as_tensor(indices, device=self._logits.device)
        self._check_range(indices)
        logits = self._logits[epoch % self.slots].index_select(0, indices)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return None if bool(logits.isnan().any()) else logits

    def exchange(self, outputs: torch.Tensor, indices: torch.Tensor | None, epoch: int, *,
                 defer: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Store this batch's logits for ``epoch`` and return what the term needs:
        ``(teacher_logits, mask)`` — the logits of epoch ``epoch − lag`` for these examples,
        in the buffer's dtype, and None or a (B,) boolean mask of the examples that have
        them (missing ones are 0 in ``teacher_logits``) — or None where the term is 0.
        ``teacher_logits`` is a buffer that the next call overwrites: use it before then.

        This is the bookkeeping of :meth:`__call__` and :meth:`gradient` without the KL;
        the ``"saf"`` method passes its result to
        :func:`~ridgeline.optim.fused.cross_entropy_distillation_value_and_grad`. It runs
        once per step, so it does no more than the checks, one gather and one scatter.

        ``defer=True`` (the ``"saf"`` method) keeps references to this batch's logits and
        indices and writes them into the buffer a few batches at a time (at most
        ``max(1, min(2048, 2**20 // O))`` rows, and always before the epoch ends or
        :meth:`stored_logits` reads): inside a training step the conversion to ``dtype``
        and the scatter cost about 30 µs each on a CPU, far more than on warm caches. The
        term never reads the current epoch, so the values are the same; do not modify the
        logits or the index tensor in place afterwards, and an index out of range is then
        reported by the call that writes it."""
        indices = self._check(outputs, indices)
        if self._logits is None:
            self._allocate(outputs.device)
        epoch = int(epoch)
        if epoch != self._epoch:
            self._advance(epoch)
        device = self._logits.device
        same_device = outputs.device == device
        if indices.device != device:
            indices = indices.to(device)
        self._seen += indices.shape[0]
        found = None
        past = epoch - self.lag
        slot = past % self.slots
        try:
            # the authors' rule, `epoch > kl_start_epoch` with epochs counted from 0
            if self._slot_epoch[slot] == past and self.weight > 0 and self._start.active(epoch):
                teacher = torch.index_select(self._slot_views[slot], 0, indices,
                                             out=self._work("teacher", indices.shape[0]))
                if not same_device:
                    teacher = teacher.to(outputs.device)
                mask = None
                if not self._complete.get(past, False):  # some examples may be missing
                    mask = ~teacher[:, 0].isnan()
                    teacher = teacher.nan_to_num(0.0)
                if mask is None or bool(mask.any()):
                    found = teacher, mask
        except IndexError:
            self._check_range(indices)
            raise
        if defer:
            self._pending.append((indices, outputs.detach()))
            self._pending_rows += indices.shape[0]
            if self._pending_rows >= self._flush_rows:
                self._flush()
        else:
            self._flush()
            stored = outputs.detach()
            if stored.dtype != self.dtype or not same_device:
                stored = self._work("stored", indices.shape[0]).copy_(stored)
            self._write(indices, stored)
        return found

    def _write(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        try:
            self._slot_views[self._epoch % self.slots].index_copy_(0, indices, values)
        except IndexError:
            self._check_range(indices)
            raise

    def _flush(self) -> None:
        """Write the deferred logits of the current epoch into its slot."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if len(pending) == 1:
            indices, values = pending[0]
        else:
            indices = torch.cat([i for i, _ in pending])
            values = torch.cat([v for _, v in pending])
        self._write(indices, values.to(self._logits.device, self.dtype))

    def __call__(self, outputs: torch.Tensor, indices: torch.Tensor | None, epoch: int) -> torch.Tensor:
        """Store this batch's logits for ``epoch`` and return λ τ² · mean KL against the
        logits of ``epoch − lag`` (0 before :attr:`first_active_epoch` or without such
        logits)."""
        found = self.exchange(outputs, indices, epoch)
        if found is None:
            return outputs.new_zeros(())
        teacher, mask = found
        return distillation_kl(teacher, outputs, self.temperature, mask, weight=self.weight)

    def gradient(self, outputs: torch.Tensor, indices: torch.Tensor | None,
                 epoch: int) -> torch.Tensor | None:
        """Like calling it, but return the term's gradient with respect to ``outputs``,
        λτ m_i (softmax(f_i/τ) − softmax(ŷ_i/τ))/B as a (B, O) tensor without a graph, or
        None where the term is 0; the KL itself is not evaluated. Train with
        ``torch.autograd.backward((loss, outputs), (None, g))`` (what the ``"saf"`` method
        does for a loss it cannot fuse with the term, see :class:`~ridgeline.optim.methods.SAFStep`):
        the same update as backpropagating ``loss + saf(outputs, indices, epoch)``."""
        found = self.exchange(outputs, indices, epoch)
        if found is None:
            return None
        teacher, mask = found
        return distillation_kl_gradient(teacher, outputs, self.temperature, mask,
                                        weight=self.weight)

    def describe(self) -> dict:
        return {"lag": self.lag, "temperature": self.temperature, "weight": self.weight,
                "start_epoch": self.start_epoch, "first_epoch": self.first_epoch,
                "first_active_epoch": self.first_active_epoch,
                "dtype": str(self.dtype).replace("torch.", ""),
                "memory_bytes": self.memory_bytes}
