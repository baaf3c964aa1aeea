"""Haar DWT/IDWT: agrees with PyWavelets, inverts exactly, is orthonormal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.nets.wavelet import HAAR_BAND_NAMES, _haar_matrix_3d, haar_dwt3d, haar_idwt3d

pywt = pytest.importorskip("pywt")


def test_band_names_follow_pywt_key_order():
    keys = list(pywt.dwtn(np.zeros((2, 2, 2)), "haar").keys())
    assert list(HAAR_BAND_NAMES) == keys


def test_matches_pywt_for_every_band_and_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 6, 4, generator=g, dtype=torch.float64)
    y = haar_dwt3d(x)
    assert y.shape == (2, 24, 4, 3, 2)
    c = x.shape[1]
    for bi in range(2):
        for ci in range(c):
            ref = pywt.dwtn(x[bi, ci].numpy(), "haar")
            for band, name in enumerate(HAAR_BAND_NAMES):
                # band-major layout: channel band*C + c
                np.testing.assert_allclose(y[bi, band * c + ci].numpy(), ref[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_idwt_inverts_dwt(dtype, tol):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    y = haar_dwt3d(x)
    assert y.dtype == dtype
    assert torch.allclose(haar_idwt3d(y), x, rtol=0, atol=tol)
    assert torch.allclose(haar_dwt3d(haar_idwt3d(y)), y, rtol=0, atol=tol)


def test_norm_preserving_and_orthonormal():
    m = _haar_matrix_3d(torch.float64, torch.device("cpu"))
    assert torch.allclose(m @ m.T, torch.eye(8, dtype=torch.float64), atol=1e-15)
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    assert torch.isclose(haar_dwt3d(x).norm(), x.norm(), rtol=1e-13)


def test_white_noise_stays_white():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 16, 16, 16, generator=g, dtype=torch.float64)
    y = haar_dwt3d(x).transpose(0, 1).reshape(8, -1)
    cov = torch.cov(y)
    # 2048 samples per band: sampling error of a unit variance ~ 0.03
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=0.12)


def test_constant_volume_has_only_low_band():
    y = haar_dwt3d(torch.ones(1, 1, 4, 4, 4))
    assert torch.allclose(y[:, 0], torch.full((1, 2, 2, 2), 8**0.5))
    # zero to float32 rounding (how exactly 0 depends on the conv kernel torch picks)
    assert y[:, 1:].abs().max() < 1e-6


def test_clear_errors():
    with pytest.raises(InputError, match="even"):
        haar_dwt3d(torch.zeros(1, 1, 4, 5, 4))
    with pytest.raises(InputError, match="5D"):
        haar_dwt3d(torch.zeros(4, 4, 4))
    with pytest.raises(InputError, match="floating"):
        haar_dwt3d(torch.zeros(1, 1, 4, 4, 4, dtype=torch.int32))
    with pytest.raises(InputError, match="multiple of 8"):
        haar_idwt3d(torch.zeros(1, 6, 2, 2, 2))


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(1, 3),
    d=st.integers(1, 5),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(b, c, d, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, 2 * d, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    y = haar_dwt3d(x)
    assert y.shape == (b, 8 * c, d, h, w)
    assert torch.allclose(haar_idwt3d(y), x, rtol=0, atol=1e-12)
    assert torch.isclose(y.norm(), x.norm(), rtol=1e-12)
    ref = pywt.dwtn(x[0, c - 1].numpy(), "haar")
    np.testing.assert_allclose(y[0, 7 * c + c - 1].numpy(), ref["ddd"], atol=1e-12)
