"""A watershed on small arrays: scikit-image's, through its compiled core without the per-call checks."""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.segmentation import watershed

__all__ = []


def _watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(image, markers, mask=mask)`` on a small 2-D array.

    The same inputs go to the same compiled flooding (connectivity 1, no compactness, no
    watershed lines); only the Python wrapper's generic set-up is skipped (np.pad, footprint
    and offset tables: ~0.7 ms a call against ~0.08 ms for the flooding of a nucleus's box).
    Falls back to the public function when the compiled routine is not the one this was
    written against (its signature changed after scikit-image 0.26).
    """
    global _WATERSHED_CORE
    if _WATERSHED_CORE is None:
        return watershed(image, markers, mask=mask)
    h, w = image.shape
    mask = np.asarray(mask, dtype=bool)
    markers = np.asarray(markers) * mask
    img = np.zeros((h + 2, w + 2), np.float64)
    img[1:-1, 1:-1] = image
    flood = np.zeros((h + 2, w + 2), np.int8)
    flood[1:-1, 1:-1] = mask
    out = np.zeros((h + 2, w + 2), markers.dtype)
    out[1:-1, 1:-1] = markers
    # skimage's neighbour offsets for connectivity 1 on the padded array, in its order
    neighbours = np.array([-(w + 2), -1, 1, w + 2], np.intp)
    try:
        _WATERSHED_CORE(img.ravel(), np.flatnonzero(out), neighbours, flood.ravel(),
                        np.array([w + 2, 1], np.intp), 0.0, out.ravel(), False)
    except TypeError:
        _WATERSHED_CORE = None
        return watershed(image, markers, mask=mask)
    return out[1:-1, 1:-1].copy()


def _watershed_core() -> Any:
    try:
        import skimage
        from skimage.segmentation import _watershed_cy
    except ImportError:
        return None
    major_minor = tuple(int(v) for v in skimage.__version__.split(".")[:2])
    return _watershed_cy.watershed_raveled if major_minor == (0, 26) else None


_WATERSHED_CORE = _watershed_core()
