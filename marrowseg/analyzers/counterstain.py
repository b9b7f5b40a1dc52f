"""How dark a slide's counterstain is, read from its nuclei and nothing else.

A percentile over all stained pixels follows the mix of what is stained: in a fatty marrow the
99th percentile of haematoxylin falls into the pale adipocyte membranes, and a marker-ink
stroke takes it over. Nuclei are the one structure whose counterstain density does not depend
on how many of them there are, so the level here is the median, over nucleus-like blobs of a
few sample patches, of each blob's upper haematoxylin density: each blob is one vote, however
much fat, cytoplasm or ink lies between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from skimage import measure

from marrowseg import stains
from marrowseg.analyzers import tissue as tis

__all__ = ["nuclear_level"]


def _relief(h: np.ndarray, mpp: float, cfg: Any) -> np.ndarray:
    """How far each pixel of the smoothed counterstain stands above its surroundings, OD."""
    smooth = cv2.GaussianBlur(h, (0, 0), 0.5 / mpp)
    r = max(1, int(round(cfg.level_background_um / mpp)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    # the opening by a disk wider than any nucleus is what lies around the nuclei (cytoplasm,
    # membranes, an ink stroke's plateau); a nucleus stands above it
    return smooth - cv2.morphologyEx(smooth, cv2.MORPH_OPEN, disk)


def _blob_values(h: np.ndarray, relief: np.ndarray, min_contrast_od: float, mpp: float, cfg: Any) -> np.ndarray:
    """Each nucleus-like blob's ``level_percentile`` of ``h`` (one patch)."""
    raised = relief > min_contrast_od
    # thin lines (fat membranes, fibres) that pass the contrast test are not nuclei
    w = max(1, int(round(1.0 / mpp)))
    raised = cv2.morphologyEx(raised.astype(np.uint8), cv2.MORPH_OPEN,
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (w | 1, w | 1)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(raised, connectivity=4)
    lo, hi = cfg.level_blob_area_um2
    area = stats[:, cv2.CC_STAT_AREA] * mpp**2
    sized = (area >= lo) & (area <= hi)
    sized[0] = False
    if not sized.any():
        return np.zeros(0)
    # the length test first, from every blob's second moments at once (scikit-image's major axis,
    # 4 sqrt of the inertia tensor's larger eigenvalue): a regionprops pass for it cost ~0.15 ms a
    # blob, most of a slide's level with ~2,000 blobs
    short = sized & (_major_axis_px(labels, stats, n) * mpp <= cfg.level_max_length_um)
    if not short.any():
        return np.zeros(0)
    # most components are specks: the convex hull of the solidity only for the sized, short ones
    labels = np.where(short[labels], labels, 0)
    q = float(cfg.level_percentile)

    def upper(region: np.ndarray, values: np.ndarray) -> float:
        return float(np.percentile(values[region], q))

    props = measure.regionprops_table(labels, h, properties=("solidity",), extra_properties=(upper,))
    return np.asarray(props["upper"], float)[props["solidity"] >= cfg.level_min_solidity]


def _major_axis_px(labels: np.ndarray, stats: np.ndarray, n: int) -> np.ndarray:
    """Major axis length of each component, pixels (0 for the background), as
    ``skimage.measure.regionprops(...).axis_major_length``."""
    rr, cc = np.nonzero(labels)
    lab = labels[rr, cc]
    # coordinates from each component's own corner: small numbers, no cancellation in the moments
    y = (rr - stats[lab, cv2.CC_STAT_TOP]).astype(np.float64)
    x = (cc - stats[lab, cv2.CC_STAT_LEFT]).astype(np.float64)
    m = np.maximum(stats[:, cv2.CC_STAT_AREA], 1).astype(np.float64)
    sy, sx = np.bincount(lab, y, n), np.bincount(lab, x, n)
    vyy = np.bincount(lab, y * y, n) / m - (sy / m) ** 2
    vxx = np.bincount(lab, x * x, n) / m - (sx / m) ** 2
    vxy = np.bincount(lab, x * y, n) / m - (sy / m) * (sx / m)
    big = (vyy + vxx) / 2 + np.sqrt(((vyy - vxx) / 2) ** 2 + vxy**2)
    return 4.0 * np.sqrt(np.maximum(big, 0.0))


def nuclear_level(patches: Sequence[np.ndarray], h_from_od: np.ndarray, mpp: float, cfg: Any,
                  opaque_cfg: Any = None) -> tuple[float | None, int]:
    """The slide's nuclear counterstain density.

    Parameters
    ----------
    patches : sequence of (H, W, 3) uint8 ndarray
        Sample patches of the slide at the analysis resolution.
    h_from_od : (3,) ndarray
        Row of the inverse stain matrix that turns RGB optical density into the
        counterstain's density (unscaled).
    mpp : float
        Pixel size of the patches, µm per pixel.
    cfg : ECadStainConfig
        ``level_*`` settings: the blob test (area in µm², solidity, length in µm, contrast
        above the surrounding counterstain as a fraction of the level and in OD at least,
        background radius in µm) and the percentile taken in each blob. The contrast a blob
        needs is a fraction of the level, and at least ``level_min_contrast_od``, so the level
        is a fixed point, found in a few steps from ``h_reference_od``: with an absolute
        contrast alone a darker stain lets paler nuclei vote and the level falls behind the
        stain; with a relative one alone, on a pale slide the touching nuclei and their
        cytoplasm merge into blobs too large to vote.
    opaque_cfg : TissueClassesConfig, optional
        Black fill and black ink (:func:`marrowseg.analyzers.tissue.opaque_colour`) are set
        to no stain before the blobs are looked for.

    Returns
    -------
    level : float or None
        Median over the blobs of their percentile, OD; None when fewer than
        ``cfg.level_min_blobs`` blobs were found.
    n_blobs : int
        Blobs that voted.
    """
    h_from_od = np.asarray(h_from_od, np.float32)
    planes = []
    for rgb in patches:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or min(rgb.shape[:2]) < 8:
            continue
        h = stains.od_from_rgb(rgb) @ h_from_od
        opaque = tis.opaque_colour(rgb, opaque_cfg) if opaque_cfg is not None else None
        if opaque is not None:  # None: the opaque test is off
            h[opaque] = 0.0
        h = np.ascontiguousarray(h, np.float32)
        planes.append((h, _relief(h, float(mpp), cfg)))
    # where the OD floor and the relative cut meet, when scaling is off
    start = cfg.h_reference_od or cfg.level_min_contrast_od / cfg.level_min_contrast
    level, n, used = float(start), 0, None
    for _ in range(cfg.level_max_steps):
        contrast = max(cfg.level_min_contrast_od, cfg.level_min_contrast * level)
        if contrast == used:
            break  # the OD floor holds: the same cut gives the same blobs
        votes = [_blob_values(h, relief, contrast, float(mpp), cfg) for h, relief in planes]
        v = np.concatenate(votes) if votes else np.zeros(0)
        n = int(len(v))
        if n < cfg.level_min_blobs:
            return None, n
        new = float(np.median(v))
        done = abs(new - level) <= 0.01 * new
        level, used = new, contrast
        if done:
            break
    return level, n
