"""Figures shared by the CLI, the HTML report and the QA notebook."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from marrowseg.analyzers.reticulin import GRADE_RGB

__all__ = ["grid_thumbnail", "GRADE_RGB", "fit_size", "cell_class_colours", "draw_cells", "draw_fibres", "grade_heatmap"]


def grid_thumbnail(thumb: np.ndarray, layout: Any) -> np.ndarray:
    """Draw the tissue mask outline (green) and the tile cores (blue) on a thumbnail.

    Parameters
    ----------
    thumb : (h, w, 3) uint8 ndarray
        Thumbnail of the whole slide.
    layout : SlideLayout
        From :func:`marrowseg.engine.plan_slide`.
    """
    img = np.ascontiguousarray(thumb.copy())
    h, w = img.shape[:2]
    mask = layout.tissue_mask
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, (0, 170, 0), 2)
    fr = h / layout.shape_px[0]
    fc = w / layout.shape_px[1]
    for t in layout.tiles:
        rs, cs = t.core_slide
        cv2.rectangle(img, (int(cs.start * fc), int(rs.start * fr)),
                      (max(int(cs.start * fc), int(cs.stop * fc) - 1), max(int(rs.start * fr), int(rs.stop * fr) - 1)),
                      (40, 80, 220), 1)
    return img


# ----------------------------------------------------------------------------- report figures
# colours of the local MF grades: analyzers.reticulin.GRADE_RGB ("not graded" is left as the slide)


def fit_size(img: np.ndarray, max_px: int) -> np.ndarray:
    """Shrink an image (area interpolation) so that its longest side is at most ``max_px``."""
    h, w = img.shape[:2]
    s = max(h, w) / float(max_px)
    if s <= 1.0:
        return img
    size = (max(1, int(round(w / s))), max(1, int(round(h / s))))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def cell_class_colours(stain: str) -> dict[str, tuple[int, int, int]]:
    """Cell class name -> RGB of a stain's analyzer (the colours of ``overlay.png``)."""
    import importlib

    from marrowseg.analyzers import ANALYZERS

    target = ANALYZERS.get(stain)
    if target is None:
        return {}
    mod, cls = target.split(":")
    return {c.name: tuple(c.rgb) for c in getattr(importlib.import_module(mod), cls).cell_classes}


def draw_cells(rgb: np.ndarray, cells_rc: np.ndarray, colours: np.ndarray, *, radius_px: int) -> np.ndarray:
    """Circles of each cell's class colour on a copy of ``rgb`` (2 px outline, anti-aliased).

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
    cells_rc : (N, 2) float ndarray
        Centres (row, col) in ``rgb`` pixels.
    colours : (N, 3) uint8 ndarray
    radius_px : int
    """
    out = np.ascontiguousarray(rgb.copy())
    for (r, c), col in zip(np.asarray(cells_rc), np.asarray(colours), strict=True):
        cv2.circle(out, (int(round(c)), int(round(r))), int(radius_px), tuple(int(v) for v in col), 2,
                   lineType=cv2.LINE_AA)
    return out


def draw_fibres(rgb: np.ndarray, fibres: np.ndarray | None, skeleton: np.ndarray | None) -> np.ndarray:
    """Fibre mask (cyan, half-transparent) and skeleton (magenta) over a field.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
    fibres, skeleton : (h, w) ndarray or None
        Maps of the same field at any resolution (nonzero = on); resized by nearest neighbour.
    """
    out = rgb.astype(np.float32)
    size = (rgb.shape[1], rgb.shape[0])
    if fibres is not None:
        m = cv2.resize((fibres > 0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        out[m] = out[m] * 0.45 + np.array((0, 200, 230), np.float32) * 0.55
    if skeleton is not None:
        s = cv2.resize((skeleton > 0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        out[s] = (230, 0, 200)
    return out.astype(np.uint8)


def grade_heatmap(thumb: np.ndarray, grades: np.ndarray, *, origin_um: tuple[float, float], side_um: float,
                  thumb_mpp: float, alpha: float = 0.55) -> np.ndarray:
    """Local MF grades blended over a slide thumbnail, one square per window.

    Parameters
    ----------
    thumb : (H, W, 3) uint8 ndarray
        Whole-slide thumbnail.
    grades : (R, C) int ndarray
        Grade 0..3 per window, -1 where not graded (left clear, outlined grey).
    origin_um : (float, float)
        (row, col) of window [0, 0]'s top-left corner from the slide's top-left, µm.
    side_um : float
        Window side, µm.
    thumb_mpp : float
        µm per thumbnail pixel.
    """
    out = thumb.astype(np.float32)
    h, w = thumb.shape[:2]
    edges = []
    for (r, c), g in np.ndenumerate(grades):
        r0 = int(round((origin_um[0] + r * side_um) / thumb_mpp))
        c0 = int(round((origin_um[1] + c * side_um) / thumb_mpp))
        r1 = min(h, int(round((origin_um[0] + (r + 1) * side_um) / thumb_mpp)))
        c1 = min(w, int(round((origin_um[1] + (c + 1) * side_um) / thumb_mpp)))
        if r1 <= r0 or c1 <= c0:
            continue
        if g >= 0:
            out[r0:r1, c0:c1] = out[r0:r1, c0:c1] * (1 - alpha) + np.array(GRADE_RGB[int(g)], np.float32) * alpha
        edges.append((r0, c0, r1, c1, g))
    img = np.ascontiguousarray(out.astype(np.uint8))
    for r0, c0, r1, c1, g in edges:
        if r1 - r0 >= 4:
            cv2.rectangle(img, (c0, r0), (c1 - 1, r1 - 1), (255, 255, 255) if g >= 0 else (150, 150, 150), 1)
    return img
