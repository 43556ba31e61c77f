"""Spectrum, kernel-target alignment and drift against numpy and their defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ridgeline.errors import DataError, ShapeMismatchError
from ridgeline.kernels import KernelSpectrum, alignment, drift, relative_error, spectrum


def _psd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T


def test_spectrum_matches_numpy_eigvalsh():
    k = _psd(7, 0)
    result = spectrum(k)
    expected = np.sort(np.linalg.eigvalsh(k.numpy()))[::-1]
    np.testing.assert_allclose(result.values.numpy(), expected, rtol=1e-10)
    assert result.condition_number == pytest.approx(expected[0] / expected[-1])
    assert result.effective_rank == pytest.approx(expected.sum() ** 2 / (expected ** 2).sum())
    assert result.trace == pytest.approx(float(np.trace(k.numpy())))
    out = result.to_dict()
    assert out["largest"] == pytest.approx(expected[0]) and len(out["values"]) == 7


def test_spectrum_of_a_full_kernel_is_that_of_its_matrix_and_singular_has_infinite_condition():
    big = _psd(6, 1)
    full = big.reshape(3, 2, 3, 2).permute(0, 2, 1, 3)
    np.testing.assert_allclose(spectrum(full).values.numpy(),
                               np.sort(np.linalg.eigvalsh(big.numpy()))[::-1], rtol=1e-10)
    ones = torch.ones(4, 4, dtype=torch.float64)
    assert spectrum(ones).condition_number == float("inf")


def test_spectrum_plot_returns_axes():
    import matplotlib

    matplotlib.use("Agg")
    ax = spectrum(_psd(5, 2)).plot(label="K")
    assert ax.get_xscale() == "log" and ax.get_legend() is not None
    assert isinstance(spectrum(_psd(3, 3)), KernelSpectrum)


def test_alignment_matches_its_definition_with_one_hot_labels():
    k = _psd(6, 4)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    y = np.eye(3)[labels.numpy()]
    t = y @ y.T
    expected = (k.numpy() * t).sum() / (np.linalg.norm(k.numpy()) * np.linalg.norm(t))
    assert alignment(k, labels) == pytest.approx(expected)
    h = np.eye(6) - 1 / 6
    kc, tc = h @ k.numpy() @ h, h @ t @ h
    assert alignment(k, labels, centered=True) == pytest.approx(
        (kc * tc).sum() / (np.linalg.norm(kc) * np.linalg.norm(tc)))


def test_alignment_is_one_for_the_target_kernel_and_handles_full_kernels():
    y = torch.randn(5, 2, dtype=torch.float64)
    assert alignment(3.0 * y @ y.T, y) == pytest.approx(1.0)
    full = torch.einsum("ao,bq->aboq", y, y)
    assert alignment(full, y) == pytest.approx(1.0)
    vector = torch.randn(5, dtype=torch.float64)
    assert alignment(torch.outer(vector, vector), vector) == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_drift_and_alignment_properties(n, seed, scale):
    a, b = _psd(n, seed), _psd(n, seed + 1)
    assert drift(a, a) == pytest.approx(0.0, abs=1e-12)
    assert drift(a, scale * a) == pytest.approx(0.0, abs=1e-12)  # scale is not drift
    assert drift(a, b) == pytest.approx(drift(b, a))
    assert 0.0 <= drift(a, b) <= 1.0 + 1e-12  # PSD kernels have a non-negative inner product
    labels = torch.arange(n) % 3
    assert -1.0 - 1e-12 <= alignment(a, labels) <= 1.0 + 1e-12
    assert relative_error(a, a) == 0.0


def test_drift_matches_its_definition():
    a, b = _psd(5, 5), _psd(5, 6)
    an, bn = a.numpy(), b.numpy()
    expected = 1 - (an * bn).sum() / (np.linalg.norm(an) * np.linalg.norm(bn))
    assert drift(a, b) == pytest.approx(expected)
    assert relative_error(a, b) == pytest.approx(np.linalg.norm(an - bn) / np.linalg.norm(bn))


def test_bad_kernels_are_refused():
    with pytest.raises(ShapeMismatchError, match="square"):
        spectrum(torch.zeros(3, 4))
    with pytest.raises(ShapeMismatchError, match="same inputs"):
        drift(torch.zeros(3, 3), torch.zeros(4, 4))
    with pytest.raises(ShapeMismatchError, match="one row per example"):
        alignment(torch.eye(3), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="NaN"):
        spectrum(torch.full((2, 2), float("nan")))
    with pytest.raises(ShapeMismatchError, match="outputs"):
        alignment(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2))
