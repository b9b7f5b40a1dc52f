"""Quick-look images: label maps as PNG and overlays of classes and cells on the slide."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from marrowseg.outputs.atomic import atomic_write_bytes

__all__ = ["encode_png", "write_png", "colourize", "overlay"]


def encode_png(rgb_or_grey: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3) uint8 RGB array."""
    arr = np.asarray(rgb_or_grey)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError(f"cannot encode array of shape {arr.shape} as PNG")
    return buf.tobytes()


def write_png(path: str | Path, rgb_or_grey: np.ndarray) -> Path:
    return atomic_write_bytes(path, encode_png(rgb_or_grey))


def colourize(labels: np.ndarray, classes: Sequence) -> np.ndarray:
    """RGB image of a label map, each value in its class colour (unknown values black)."""
    lut = np.zeros((256, 3), np.uint8)
    for c in classes:
        lut[c.value] = c.rgb
    return lut[labels.astype(np.uint8)]


def overlay(
    rgb: np.ndarray,
    labels: np.ndarray | None,
    classes: Sequence,
    *,
    alpha: float = 0.35,
    cells_rc: np.ndarray | None = None,
    cell_rgb: np.ndarray | None = None,
    radius_px: int = 3,
) -> np.ndarray:
    """Blend class colours over an RGB image and draw cells as small circles.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
    labels : (h, w) ndarray or None
        Label map of the same field at any resolution (resized by nearest neighbour).
    classes : sequence of LabelClass
    alpha : float
        Opacity of the class colours; value 0 (excluded) is left clear.
    cells_rc : (N, 2) float ndarray, optional
        Cell centres (row, col) in ``rgb`` pixels.
    cell_rgb : (N, 3) uint8 ndarray, optional
        Colour of each cell.
    """
    out = rgb.copy()
    if labels is not None:
        lab = cv2.resize(labels.astype(np.uint8), (rgb.shape[1], rgb.shape[0]),
                         interpolation=cv2.INTER_NEAREST)
        col = colourize(lab, classes).astype(np.float32)
        m = lab > 0
        out[m] = (out[m] * (1 - alpha) + col[m] * alpha).astype(np.uint8)
    if cells_rc is not None and len(cells_rc):
        bgr = np.ascontiguousarray(out)
        for (r, c), colr in zip(np.asarray(cells_rc), np.asarray(cell_rgb), strict=True):
            cv2.circle(bgr, (int(round(c)), int(round(r))), radius_px, tuple(int(v) for v in colr), 1,
                       lineType=cv2.LINE_AA)
        out = bgr
    return out
