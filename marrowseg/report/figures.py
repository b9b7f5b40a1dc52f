"""Figures shared by the CLI, the HTML report and the QA notebook."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

__all__ = ["grid_thumbnail"]


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
