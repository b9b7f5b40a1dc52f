"""Binary morphology through OpenCV must give SciPy's masks."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from marrowseg.analyzers import morphology as morph


def _footprints(r):
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return [np.ones((3, 3), bool), (yy**2 + xx**2) <= r * r + 1e-9, np.ones((5, 5), bool),
            ndi.generate_binary_structure(2, 1)]


def _repeat(fn, mask, fp, n):
    # SciPy's own ``iterations`` > 1 corrupts the heap for footprints larger than 3x3 on small
    # images (SciPy 1.17.1), so the reference repeats single steps
    for _ in range(n):
        mask = fn(mask, structure=fp)
    return mask


@pytest.mark.parametrize("seed", range(4))
def test_binary_morphology_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    for t in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 60, 2))
        mask = rng.random(shape) < rng.uniform(0.05, 0.9)
        fp = _footprints(int(rng.integers(0, 4)))[t % 4]
        n = 1 + t % 3
        assert np.array_equal(morph.binary_dilation(mask, fp, n), _repeat(ndi.binary_dilation, mask, fp, n))
        assert np.array_equal(morph.binary_erosion(mask, fp, n), _repeat(ndi.binary_erosion, mask, fp, n))
        assert np.array_equal(morph.binary_opening(mask, fp), ndi.binary_opening(mask, structure=fp))
        assert np.array_equal(morph.binary_closing(mask, fp), ndi.binary_closing(mask, structure=fp))


def test_asymmetric_or_even_footprints_are_refused():
    mask = np.zeros((5, 5), bool)
    for fp in (np.ones((2, 2), bool), np.array([[1, 1, 0]], bool)):
        with pytest.raises(ValueError, match="symmetric"):
            morph.binary_dilation(mask, fp)
