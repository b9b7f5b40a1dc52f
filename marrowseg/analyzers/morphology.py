"""Binary morphology through OpenCV, with SciPy's figures.

``scipy.ndimage.binary_dilation`` and ``binary_erosion`` walk the structuring element pixel
by pixel; OpenCV's van Herk/Gil-Werman passes are 5-20 times faster on a tile. For a
symmetric footprint of odd size the two agree exactly once OpenCV is told what SciPy
assumes beyond the image: nothing (``border_value=0``) for erosion and dilation alike.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["binary_dilation", "binary_erosion", "binary_opening", "binary_closing"]


def _morph(mask: np.ndarray, footprint: np.ndarray, ops: tuple[str, ...], iterations: int = 1) -> np.ndarray:
    fp = np.asarray(footprint, bool)
    if fp.ndim != 2 or fp.shape[0] % 2 == 0 or fp.shape[1] % 2 == 0 or not np.array_equal(fp, fp[::-1, ::-1]):
        raise ValueError(f"footprint must be 2-D, of odd size and symmetric, got shape {fp.shape}")
    img = np.ascontiguousarray(mask, dtype=np.uint8)
    se = fp.astype(np.uint8)
    for op in ops:
        fn = cv2.erode if op == "erode" else cv2.dilate
        img = fn(img, se, iterations=iterations, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return img.astype(bool)


def binary_dilation(mask: np.ndarray, footprint: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, structure=footprint, iterations=iterations)``.

    Parameters
    ----------
    mask : (H, W) bool ndarray
    footprint : (h, w) bool ndarray
        Symmetric (``footprint == footprint[::-1, ::-1]``), odd sides, in pixels.
    iterations : int
        Times the dilation is repeated (>= 1).

    Returns
    -------
    (H, W) bool ndarray
    """
    return _morph(mask, footprint, ("dilate",), iterations)


def binary_erosion(mask: np.ndarray, footprint: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, structure=footprint, iterations=iterations)`` (pixels beyond the edge are False)."""
    return _morph(mask, footprint, ("erode",), iterations)


def binary_opening(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_opening(mask, structure=footprint)`` for a symmetric footprint."""
    return _morph(mask, footprint, ("erode", "dilate"))


def binary_closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, structure=footprint)`` for a symmetric footprint."""
    return _morph(mask, footprint, ("dilate", "erode"))
