"""TrajectoryLoss against a table of known logits per (epoch, example) and a direct KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax

from ridgeline.errors import ConfigError, DataError, ShapeMismatchError
from ridgeline.optim import IndexedDataset, TrajectoryLoss

N, OUT = 23, 4


def _table(epochs: int, seed: int = 0) -> torch.Tensor:
    """Known logits: table[e, i] is what example i outputs in epoch e."""
    return torch.randn(epochs + 1, N, OUT, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 3


def _direct_kl(past: np.ndarray, now: np.ndarray, tau: float, weight: float,
               mask: np.ndarray | None = None) -> float:
    """λ τ² mean_i Σ_k p_ik (log p_ik − log q_ik), p = softmax(past/τ), q = softmax(now/τ)."""
    p, log_p, log_q = softmax(past / tau, axis=1), log_softmax(past / tau, axis=1), log_softmax(now / tau, axis=1)
    per = (p * (log_p - log_q)).sum(axis=1)
    if mask is not None:
        per = per * mask
    return weight * tau ** 2 * per.mean()


def _batches(epoch: int, batch: int = 5):
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    return [order[s:s + batch] for s in range(0, N, batch)]


def test_returns_the_logits_of_lag_epochs_earlier_for_shuffled_batches():
    table = _table(8)
    saf = TrajectoryLoss(N, OUT, lag=3, temperature=2.0, weight=0.5, start_epoch=1,
                         dtype=torch.float32)
    for epoch in range(1, 9):
        for idx in _batches(epoch):
            now = table[epoch, idx].float()
            if epoch - 3 >= 1:
                stored = saf.stored_logits(idx, epoch - 3)
                torch.testing.assert_close(stored, table[epoch - 3, idx].float(), rtol=0, atol=0)
            value = saf(now, idx, epoch)
            if epoch <= 3:  # no logits from 3 epochs earlier yet
                assert float(value) == 0.0
            else:
                expected = _direct_kl(table[epoch - 3, idx].numpy(), now.double().numpy(), 2.0, 0.5)
                assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # only lag + 1 epochs are kept
    assert saf.stored_logits(torch.arange(N), 4) is None
    torch.testing.assert_close(saf.stored_logits(torch.arange(N), 5), table[5].float(), rtol=0, atol=0)


def _authors_kl_is_on(epoch0: int, kl_start_epoch: int) -> bool:
    """The rule of the authors' SAF_train.py, epochs counted from 0 by range(start, num)."""
    return epoch0 > kl_start_epoch


@pytest.mark.parametrize("first_epoch", [1, 0])
def test_kl_starts_in_the_same_epoch_of_training_as_the_authors_code(first_epoch):
    """Same setting, same epochs: the term is on exactly where the authors' ``epoch >
    kl_start_epoch`` (0-based) is, whether the caller counts epochs from 1 or from 0."""
    table = _table(10, seed=1)
    saf = TrajectoryLoss(N, OUT, lag=2, start_epoch=5, dtype=torch.float32,
                         first_epoch=first_epoch)
    on = []
    for k in range(10):  # the k-th epoch of training, k = 0, 1, ...
        epoch = first_epoch + k
        values = [float(saf(table[k + 1, idx].float(), idx, epoch)) for idx in _batches(k)]
        assert all(v > 0 for v in values) or all(v == 0 for v in values)
        on.append(values[0] > 0)
    assert on == [_authors_kl_is_on(k, 5) for k in range(10)]  # from the 7th epoch
    assert saf.first_active_epoch == first_epoch + 6
    assert saf.describe()["first_active_epoch"] == first_epoch + 6


def test_kl_is_computed_in_float64_for_a_float64_model():
    """A float64 model's term and gradient against a float64 hand computation."""
    table = _table(2, seed=7)
    tau, weight = 0.7, 0.9
    for storage in (torch.float64, torch.float32):
        saf = TrajectoryLoss(N, OUT, lag=1, temperature=tau, weight=weight, start_epoch=0,
                             dtype=storage)
        idx = torch.arange(N)
        saf(table[1], idx, 1)
        teacher = table[1].to(storage).double().numpy()  # what the buffer holds, exactly
        f = table[2].clone().requires_grad_(True)
        value = saf(f, idx, 2)
        assert value.dtype == torch.float64
        expected = _direct_kl(teacher, table[2].numpy(), tau, weight)
        assert float(value.detach()) == pytest.approx(expected, rel=1e-13, abs=0)
        value.backward()
        p = softmax(teacher / tau, axis=1)
        q = softmax(table[2].numpy() / tau, axis=1)
        np.testing.assert_allclose(f.grad.numpy(), weight * tau * (q - p) / N, rtol=1e-12,
                                   atol=1e-17)


def test_gradient_equals_closed_form():
    """∂/∂f of λτ² mean KL(p ‖ softmax(f/τ)) = λτ (softmax(f/τ) − p) / B."""
    table = _table(4, seed=2)
    saf = TrajectoryLoss(N, OUT, lag=1, temperature=3.0, weight=0.7, start_epoch=0,
                         dtype=torch.float32)
    idx = torch.arange(N)
    saf(table[1].float(), idx, 1)
    f = table[2].float().clone().requires_grad_(True)
    saf(f, idx, 2).backward()
    p = softmax(table[1].numpy() / 3.0, axis=1)
    q = softmax(table[2].numpy() / 3.0, axis=1)
    expected = 0.7 * 3.0 * (q - p) / N
    np.testing.assert_allclose(f.grad.numpy(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop", [0, 3])
def test_gradient_method_equals_closed_form_with_and_without_missing_examples(dtype, drop):
    """``TrajectoryLoss.gradient`` (what the "saf" method trains with) is the closed form
    λτ m_i (softmax(f_i/τ) − softmax(ŷ_i/τ))/B, computed here with scipy, in f's dtype."""
    table = _table(3, seed=6)
    saf = TrajectoryLoss(N, OUT, lag=1, temperature=2.5, weight=0.4, start_epoch=0,
                         dtype=dtype)
    seen = torch.randperm(N, generator=torch.Generator().manual_seed(7))[:N - drop]
    assert saf.gradient(table[1, seen].to(dtype), seen, 1) is None  # term off in epoch 1
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(8))
    grad = saf.gradient(table[2, idx].to(dtype).requires_grad_(True), idx, 2)
    assert grad.dtype == dtype and grad.shape == (N, OUT)
    mask = np.isin(idx.numpy(), seen.numpy()).astype(float)[:, None]
    p = softmax(table[1, idx].numpy() / 2.5, axis=1)
    q = softmax(table[2, idx].numpy() / 2.5, axis=1)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    np.testing.assert_allclose(grad.numpy(), 0.4 * 2.5 * mask * (q - p) / N, rtol=0, atol=tol)
    torch.testing.assert_close(saf.stored_logits(idx, 2), table[2, idx].to(dtype), rtol=0, atol=0)


def test_float16_storage_returns_rounded_logits_and_reports_memory():
    table = _table(3, seed=3)
    saf = TrajectoryLoss(N, OUT, lag=2, dtype=torch.float16)
    assert saf.memory_bytes == 3 * N * OUT * 2
    assert TrajectoryLoss(N, OUT, lag=3, dtype=torch.float32).memory_bytes == 4 * N * OUT * 4
    idx = torch.arange(N)
    saf(table[1].float(), idx, 1)
    torch.testing.assert_close(saf.stored_logits(idx, 1), table[1].half().float(), rtol=0, atol=0)
    assert saf._logits.numel() * saf._logits.element_size() == saf.memory_bytes


def test_examples_missing_from_the_past_epoch_contribute_zero():
    """A drop_last-style loader: the last 3 examples of the permutation are skipped."""
    table = _table(3, seed=4)
    saf = TrajectoryLoss(N, OUT, lag=1, temperature=1.5, weight=1.0, start_epoch=0,
                         dtype=torch.float32)
    seen = torch.randperm(N, generator=torch.Generator().manual_seed(5))[:N - 3]
    saf(table[1, seen].float(), seen, 1)
    idx = torch.arange(N)
    f = table[2].float().clone().requires_grad_(True)
    value = saf(f, idx, 2)
    mask = np.isin(np.arange(N), seen.numpy()).astype(float)
    expected = _direct_kl(table[1].numpy(), table[2].numpy(), 1.5, 1.0, mask)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    p = softmax(table[1].numpy() / 1.5, axis=1)
    q = softmax(table[2].numpy() / 1.5, axis=1)
    np.testing.assert_allclose(f.grad.numpy(), 1.5 * mask[:, None] * (q - p) / N, rtol=1e-4, atol=1e-7)


def test_bad_input_raises_clear_errors():
    saf = TrajectoryLoss(N, OUT, dtype=torch.float32)
    logits = torch.zeros(3, OUT)
    with pytest.raises(DataError, match="IndexedDataset"):
        saf(logits, None, 1)
    with pytest.raises(DataError, match=f"outside \\[0, {N}\\)"):
        saf(logits, torch.tensor([0, 1, N]), 1)
    with pytest.raises(ShapeMismatchError, match="expects"):
        saf(torch.zeros(3, OUT + 1), torch.tensor([0, 1, 2]), 1)
    with pytest.raises(ConfigError, match="lag"):
        TrajectoryLoss(N, OUT, lag=0)
    with pytest.raises(ConfigError, match="dtype"):
        TrajectoryLoss(N, OUT, dtype="int8")


def test_loader_whose_length_changes_between_epochs_is_an_error():
    saf = TrajectoryLoss(N, OUT, dtype=torch.float32)
    full, short = torch.arange(N), torch.arange(N - 5)
    saf(torch.zeros(N, OUT), full, 1)
    saf(torch.zeros(N, OUT), full, 2)
    saf(torch.zeros(N - 5, OUT), short, 3)
    with pytest.raises(DataError, match="length changed"):
        saf(torch.zeros(N, OUT), full, 4)


def test_epochs_going_back_is_an_error():
    with pytest.raises(ConfigError, match="went back"):
        saf = TrajectoryLoss(N, OUT, dtype=torch.float32)
        saf(torch.zeros(2, OUT), torch.tensor([0, 1]), 3)
        saf(torch.zeros(2, OUT), torch.tensor([0, 1]), 2)


def test_indexed_dataset_yields_matching_indices_through_a_shuffled_loader():
    x = torch.randn(N, 6)
    y = torch.arange(N) % 3
    loader = torch.utils.data.DataLoader(IndexedDataset((x, y)), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for xb, yb, index in loader:
        assert torch.equal(xb, x[index]) and torch.equal(yb, y[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(N))
    wrapped = IndexedDataset(torch.utils.data.TensorDataset(x, y))
    assert len(wrapped) == N and wrapped[7][2] == 7 and torch.equal(wrapped[7][0], x[7])
    with pytest.raises(DataError):
        IndexedDataset(42)


def test_deferred_writes_store_the_same_logits_and_give_the_same_teachers():
    """exchange(defer=True) (the "saf" method) writes a few batches at a time: teachers,
    stored logits and the completeness of each epoch equal those of immediate writes."""
    table = _table(6, seed=9)
    now, later = (TrajectoryLoss(N, OUT, lag=2, start_epoch=0, dtype=torch.float16)
                  for _ in range(2))
    later._flush_rows = 7  # flush after every second batch of 5
    masks = 0
    for epoch in range(1, 6):
        for idx in _batches(epoch)[:-1]:  # drop_last-style: 3 examples unseen per epoch
            a = now.exchange(table[epoch, idx].float(), idx, epoch)
            b = later.exchange(table[epoch, idx].float(), idx, epoch, defer=True)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
                assert (a[1] is None) == (b[1] is None)
                if a[1] is not None:
                    assert torch.equal(a[1], b[1])
                    masks += 1
    assert masks > 0
    for epoch in (3, 4, 5):
        for idx in _batches(epoch)[:-1]:
            torch.testing.assert_close(later.stored_logits(idx, epoch), now.stored_logits(idx, epoch),
                                       rtol=0, atol=0)


def test_deferred_write_with_an_index_out_of_range_raises_a_data_error():
    saf = TrajectoryLoss(N, OUT, dtype=torch.float32)
    saf.exchange(torch.zeros(3, OUT), torch.tensor([0, 1, N]), 1, defer=True)
    with pytest.raises(DataError, match=f"outside \\[0, {N}\\)"):
        saf.stored_logits(torch.arange(3), 1)
