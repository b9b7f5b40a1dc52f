"""Crush artefact: marrow squeezed before fixation, its nuclei drawn out into streaks.

A trephine core squeezed by forceps or the needle shows, often along its edge, tissue whose
nuclei are stretched and smeared into parallel strands of haematoxylin; single cells can no
longer be told apart. Read as marrow it is packed with "cells" (cellularity near 100 %) and its
drawn-out nuclei fail every round-nucleus rule (late erythroid precursors near 0 per 100), so the
pathologist leaves it out. Marrow itself has no preferred direction: nuclei are round and lie in
every direction, so the local orientation of the haematoxylin (the coherence of its structure
tensor) is low, where crushed strands share one direction over tens of µm.

Method, at the tissue-class resolution (about 1 µm/px)::

    h      = haematoxylin OD, area mean to the class grid
    g      = gradient of gaussian(h, 1 µm)           (Sobel)
    J      = gaussian(w * g g^T, sigma_um)            (w: haematopoietic class pixels, so the
                                                       edges of fat spaces, glass and bone add
                                                       no direction of their own)
    coh    = ((Jxx - Jyy)^2 + 4 Jxy^2) / (Jxx + Jyy)^2   0: no direction, 1: parallel strands
    crush  = haematopoietic & coh >= min_coherence & h_ctx >= min_h_od
             & gaussian(w, sigma_um) >= min_support, opened by open_um, parts >= min_area_um2
    zone   = crush closed by close_um: the squeezed fat spaces and strips of marrow inside it too

Fibrosis can stream as well (spindle cells between collagen), and a true crush with little
stretch reads as marrow: see docs/validation.md (Crush artefact) for what was measured.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from marrowseg.analyzers.tissue import block_mean

__all__ = ["coherence", "crush_like", "crush_zone", "fat_in_crush"]


def coherence(h: np.ndarray, weight: np.ndarray, sigma_px: float, grad_sigma_px: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Coherence of the structure tensor of ``h`` over the pixels ``weight`` marks.

    Parameters
    ----------
    h : (H, W) float32 ndarray
        Haematoxylin OD.
    weight : (H, W) bool or float ndarray
        Pixels whose gradients count.
    sigma_px : float
        Gaussian window of the tensor, pixels.
    grad_sigma_px : float
        Smoothing before the gradient, pixels.

    Returns
    -------
    coh : (H, W) float32 ndarray
        0 (no preferred direction) .. 1 (one direction); 0 where the window holds no gradient.
    support : (H, W) float32 ndarray
        Share of the window that ``weight`` covers (Gaussian-weighted).
    """
    w = np.asarray(weight, np.float32)
    g = cv2.GaussianBlur(np.asarray(h, np.float32), (0, 0), grad_sigma_px, borderType=cv2.BORDER_REFLECT)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    # a window of many pixels varies slowly: the four window means are taken on a grid `step`
    # times coarser (block means first, so nothing aliases) and brought back bilinearly
    step = max(1, int(sigma_px // 4))
    shape = h.shape

    def win(x: np.ndarray) -> np.ndarray:
        x = block_mean(x, step)
        x = cv2.GaussianBlur(x, (0, 0), sigma_px / step, borderType=cv2.BORDER_REFLECT)
        if step == 1:
            return x
        return cv2.resize(x, (x.shape[1] * step, x.shape[0] * step), interpolation=cv2.INTER_LINEAR)[: shape[0], : shape[1]]

    jxx, jyy, jxy = win(w * gx * gx), win(w * gy * gy), win(w * gx * gy)
    trace = jxx + jyy
    # the weight's own normalisation cancels in the ratio
    coh = ((jxx - jyy) ** 2 + 4 * jxy**2) / np.maximum(trace**2, np.float32(1e-12))
    coh[trace <= 0] = 0
    return np.clip(coh, 0, 1).astype(np.float32), win(w)


def crush_like(h_od: np.ndarray, k: int, h_ctx: np.ndarray, marrow: np.ndarray, class_mpp: float, cfg: Any) -> np.ndarray:
    """Class pixels of marrow that look crushed (see the module docstring).

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD at the analysis resolution.
    k : int
        Analysis pixels per class pixel.
    h_ctx : (h, w) float32 ndarray
        Local mean haematoxylin at the class resolution (the tissue maps' ``h_ctx``), OD.
    marrow : (h, w) bool ndarray
        Haematopoietic class pixels.
    class_mpp : float
        µm per class pixel.
    cfg : CrushConfig
        ``sigma_um``, ``min_coherence``, ``min_h_od``, ``min_support``, ``open_um``, ``min_area_um2``
        (``close_um`` is :func:`crush_zone`'s).

    Returns
    -------
    (h, w) bool ndarray
    """
    marrow = np.asarray(marrow, bool)
    if not marrow.any():
        return np.zeros_like(marrow)
    h = block_mean(np.asarray(h_od, np.float32), k)[: marrow.shape[0], : marrow.shape[1]]
    coh, support = coherence(h, marrow, float(cfg.sigma_um) / class_mpp, max(0.5, 1.0 / class_mpp))
    cand = marrow & (coh >= np.float32(cfg.min_coherence)) & (np.asarray(h_ctx) >= np.float32(cfg.min_h_od)) \
        & (support >= np.float32(cfg.min_support))
    if not cand.any():
        return cand
    r = int(round(float(cfg.open_um) / class_mpp))
    if r > 0:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        cand = cv2.morphologyEx(cand.view(np.uint8), cv2.MORPH_OPEN, disk).astype(bool)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cand.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    min_px = float(cfg.min_area_um2) / class_mpp**2
    big = np.zeros(n, bool)
    big[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return big[lab]


def crush_zone(crush: np.ndarray, class_mpp: float, close_um: float) -> np.ndarray:
    """The crushed area whole: ``crush`` closed by a disk of ``close_um``.

    Squeezed fat spaces and the marrow strips between strands lie inside a crushed area but show
    no strands of their own; left in, the fat of a crushed fatty marrow would stay in the marrow
    space while its marrow left it (drawn crush on mbm-dev 0003: cellularity 63 -> 24 %).
    """
    r = int(round(float(close_um) / class_mpp))
    if r <= 0 or not crush.any():
        return crush
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    # padded so that the closing does not glue the zone to the tile's edge
    pad = cv2.copyMakeBorder(crush.view(np.uint8), r, r, r, r, cv2.BORDER_CONSTANT, value=0)
    return cv2.morphologyEx(pad, cv2.MORPH_CLOSE, disk)[r:-r, r:-r].astype(bool)


def fat_in_crush(fat: np.ndarray, marrow: np.ndarray, crush: np.ndarray, class_mpp: float, band_um: float,
                 min_share: float = 0.5) -> np.ndarray:
    """Fat spaces that lie in crushed marrow: most of the marrow within ``band_um`` of each is crush.

    Parameters
    ----------
    fat, marrow, crush : (h, w) bool ndarray
        Fat and haematopoietic class pixels (before crush was taken out), and the crushed ones.
    class_mpp : float
        µm per class pixel.
    band_um : float
        Width of the band of tissue round each fat space that is looked at, µm.
    min_share : float
        Least share of that band's marrow that is crush.

    Returns
    -------
    (h, w) bool ndarray
        The pixels of those fat spaces.

    Notes
    -----
    A crushed fatty marrow keeps its fat spaces, squeezed; with its marrow left out and its fat
    left in, the marrow space that remains would read far below its cellularity (drawn crush on
    the fatty mbm-dev 0003 images: 63 -> 25 %).
    """
    if not crush.any() or not fat.any():
        return np.zeros_like(fat)
    # each pixel's distance to, and connected component of, the nearest fat pixel
    dist, nearest = cv2.distanceTransformWithLabels((~fat).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE,
                                                    labelType=cv2.DIST_LABEL_CCOMP)
    band = marrow & (dist <= np.float32(band_um / class_mpp))
    n = int(nearest.max()) + 1
    total = np.bincount(nearest[band], minlength=n)
    crushed = np.bincount(nearest[band & crush], minlength=n)
    inside = crushed >= np.float32(min_share) * np.maximum(total, 1)
    inside &= total > 0
    # the component index of a fat pixel is the index of its own component
    return fat & inside[nearest]

