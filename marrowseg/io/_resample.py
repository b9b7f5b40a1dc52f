"""Exact resampling of a level window onto a target pixel grid (pure functions).

Geometry: target pixel ``(r, c)`` covers level pixels ``[c*f_x, (c+1)*f_x)`` by
``[r*f_y, (r+1)*f_y)``; pixel centres map as ``src = (dst + 0.5) * f - 0.5``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "INTEGER_TOL",
    "integer_factor",
    "blur_sigma",
    "margin_px",
    "area_reduce",
    "linear_resample",
]

INTEGER_TOL = 1e-6
BLUR_SIGMA_PER_FACTOR = 0.4


def integer_factor(f_x: float, f_y: float) -> int | None:
    """The common integer scale factor, or None when (f_x, f_y) is not one integer.

    Parameters
    ----------
    f_x, f_y : float
        Level pixels per target pixel along x and y.

    Returns
    -------
    k : int or None
    """
    k = round(f_x)
    if k >= 1 and abs(f_x - k) < INTEGER_TOL and abs(f_y - k) < INTEGER_TOL:
        return k
    return None


def blur_sigma(f: float) -> float:
    """Gaussian anti-alias sigma in level pixels for a downsampling factor ``f`` (0 if f <= 1)."""
    return BLUR_SIGMA_PER_FACTOR * f if f > 1.0 else 0.0


def margin_px(f_x: float, f_y: float) -> int:
    """Level-pixel margin read around a window: the blur radius plus 2 px for interpolation."""
    return math.ceil(3.0 * max(blur_sigma(f_x), blur_sigma(f_y))) + 2


def area_reduce(window: np.ndarray, k: int) -> np.ndarray:
    """Block mean over k x k blocks (exact for an integer factor).

    Parameters
    ----------
    window : (H*k, W*k, 3) uint8 ndarray

    Returns
    -------
    reduced : (H, W, 3) uint8 ndarray
        Mean of each block, rounded to nearest.
    """
    if k == 1:
        return window
    h, w = window.shape[0] // k, window.shape[1] // k
    return cv2.resize(window, (w, h), interpolation=cv2.INTER_AREA)


def _axis_taps(start: int, count: int, f: float, origin: int, size: int):
    """Left tap index (into the window) and weight of each output pixel along one axis."""
    centres = (np.arange(start, start + count, dtype=np.float64) + 0.5) * f - 0.5
    left = np.floor(centres)
    weight = (centres - left).astype(np.float32)
    i0 = left.astype(np.intp) - origin
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, weight


def linear_resample(
    window: np.ndarray,
    f_x: float,
    f_y: float,
    origin_xy: tuple[int, int],
    start_xy: tuple[int, int],
    out_shape: tuple[int, int],
) -> np.ndarray:
    """Gaussian pre-blur then bilinear sampling at the exact pixel centres.

    Parameters
    ----------
    window : (H, W, 3) uint8 ndarray
        Level pixels starting at level pixel ``origin_xy`` (x, y), with a
        margin of at least :func:`margin_px` around the sampled area.
    f_x, f_y : float
        Level pixels per output pixel.
    origin_xy : (int, int)
        Level pixel (x, y) of ``window[0, 0]``.
    start_xy : (int, int)
        Target-grid (col, row) of the first output pixel.
    out_shape : (rows, cols)

    Returns
    -------
    out : (rows, cols, 3) uint8 ndarray

    Notes
    -----
    Output pixel ``c`` samples level coordinate ``(c + 0.5) * f - 0.5``
    (pixel centres), computed from the global ``c``; the result therefore
    does not depend on how a read is split into windows. The sampling is
    separable (rows, then columns) in float32. Blur sigma is 0.4 f per axis
    where f > 1 (anti-aliasing), none when upsampling.
    """
    s_x, s_y = blur_sigma(f_x), blur_sigma(f_y)
    if s_x > 0 or s_y > 0:
        r_x, r_y = math.ceil(3 * s_x), math.ceil(3 * s_y)
        window = cv2.GaussianBlur(
            window,
            (2 * r_x + 1, 2 * r_y + 1),
            sigmaX=s_x if r_x else 1e-3,
            sigmaY=s_y if r_y else 1e-3,
            borderType=cv2.BORDER_REPLICATE,
        )
    rows, cols = out_shape
    y0, y1, w_y = _axis_taps(start_xy[1], rows, f_y, origin_xy[1], window.shape[0])
    x0, x1, w_x = _axis_taps(start_xy[0], cols, f_x, origin_xy[0], window.shape[1])
    w_y = w_y[:, None, None]
    tmp = window[y0].astype(np.float32) * (1 - w_y) + window[y1].astype(np.float32) * w_y
    w_x = w_x[None, :, None]
    out = tmp[:, x0] * (1 - w_x) + tmp[:, x1] * w_x
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
