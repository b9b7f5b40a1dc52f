"""Shared dense filters agree with SciPy, the reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from marrowseg.analyzers import filters


@pytest.fixture
def img():
    return np.random.default_rng(0).random((1, 1, 61, 47)).astype(np.float32)


@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.5])
def test_gaussian_blur_matches_scipy_mirror(img, sigma):
    out = filters.gaussian_blur(torch.from_numpy(img), sigma)[0, 0].numpy()
    ref = ndi.gaussian_filter(img[0, 0].astype(np.float64), sigma, mode="mirror", truncate=3.0)
    # scipy truncates at int(3 sigma + 0.5), we at ceil(3 sigma): compare away from that tail
    np.testing.assert_allclose(out, ref, atol=2e-3)
    assert out.dtype == np.float32


@pytest.mark.parametrize("r", [1, 3, 8])
def test_max_and_min_filters_match_scipy(img, r):
    x = torch.from_numpy(img)
    np.testing.assert_array_equal(filters.max_filter(x, r)[0, 0].numpy(),
                                  ndi.maximum_filter(img[0, 0], size=2 * r + 1, mode="nearest"))
    np.testing.assert_array_equal(filters.min_filter(x, r)[0, 0].numpy(),
                                  ndi.minimum_filter(img[0, 0], size=2 * r + 1, mode="nearest"))


@pytest.mark.parametrize("shape", [(1, 1, 64, 50), (2, 3, 30, 17), (1, 2, 5, 7)])
@pytest.mark.parametrize("r", [1, 4, 12])
def test_square_filters_on_the_cpu_are_the_running_maxima_of_other_devices(shape, r, monkeypatch):
    # OpenCV serves the CPU; the shifted-slice maxima serve CUDA: they must agree bit for bit,
    # batches, channels and windows wider than the image included
    x = torch.from_numpy(np.random.default_rng(r).random(shape).astype(np.float32))
    cpu = [filters.max_filter(x, r), filters.min_filter(x, r), filters.grey_opening(x, r)]
    monkeypatch.setattr(filters, "_on_cpu", lambda t: False)
    other = [filters.max_filter(x, r), filters.min_filter(x, r), filters.grey_opening(x, r)]
    for a, b in zip(cpu, other, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(cpu[0], x) and not torch.equal(cpu[1], x)


def test_grey_opening_removes_thin_bright_lines_and_keeps_wide_ones():
    x = torch.zeros(1, 1, 40, 40)
    x[0, 0, 10, :] = 1.0          # one pixel wide
    x[0, 0, 20:30, :] = 1.0       # ten pixels wide
    out = filters.grey_opening(x, 2)[0, 0]
    assert out[10].max() == 0 and out[22:28].min() == 1


@pytest.mark.parametrize("shape", [(1, 1, 70, 53), (2, 3, 40, 64), (1, 1, 5, 9)])
@pytest.mark.parametrize("sigma", [0.7, 3.0, 6.0])
def test_the_cpu_blur_is_the_shifted_slice_blur_of_other_devices(shape, sigma, monkeypatch):
    # OpenCV serves the CPU, the shifted slices CUDA: the same taps and borders (mirrored, or
    # replicated on images narrower than the kernel), to a float32 rounding
    x = torch.from_numpy(np.random.default_rng(1).random(shape).astype(np.float32))
    cpu = filters.gaussian_blur(x, sigma)
    monkeypatch.setattr(filters, "_on_cpu", lambda t: False)
    other = filters.gaussian_blur(x, sigma)
    assert cpu.dtype == other.dtype == torch.float32 and cpu.shape == other.shape
    np.testing.assert_allclose(cpu.numpy(), other.numpy(), rtol=0, atol=1e-6)
    assert float((cpu - x).abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigma", [0.8, 4.0, 20.0])
def test_gaussian_zero_border_is_scipys_constant_mode_gaussian(dtype, sigma):
    from marrowseg.analyzers.fibres import gaussian_zero_border

    rng = np.random.default_rng(int(sigma * 10))
    img = (rng.random((90, 130)) > 0.6).astype(dtype) * rng.random((90, 130)).astype(dtype)
    got = gaussian_zero_border(img, sigma)
    want = ndi.gaussian_filter(img, sigma, mode="constant", truncate=3.0)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * float(img.max()))
