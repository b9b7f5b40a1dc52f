"""Nuclear detection and morphology classes on a haematoxylin optical-density image.

Pure functions shared by the H&E analyzer and the E-cadherin analyzer (which passes the
haematoxylin counterstain channel). Nothing here sees RGB: the caller deconvolves.

Pipeline (classical detector)::

    peak_map = gaussian(h_od, peak_sigma_um)     # dense: torch, see NucleusMaps
    mask_map = gaussian(h_od, mask_sigma_um)
    mask     = mask_map > mask_od
    mask    &= mask_map > gaussian(h_od, mask_background_sigma_um) + mask_contrast_od   # optional
    centres  = local maxima of peak_map, >= min_peak_od, >= min_distance_um apart, inside mask
               (seeds: distance -- maxima of the distance to the mask's edge + a little peak_map,
               so touching nuclei sharing one haematoxylin maximum get a seed each; he.yaml)
    labels   = watershed(-peak_map (or that distance relief), centres, mask)
    labels   = split_by_shape(labels)                # optional: large, non-convex regions cut
                                                     # at their waists (overlapping nuclei)
    labels   = merge_megakaryocytes(labels)          # optional: the lobes and chromatin peaks of
                                                     # one very large nucleus made one again
    labels   = split_by_area(labels)                 # optional: a region round(area / nucleus
                                                     # area) >= 2 nuclei large is cut by k-means
    labels   = group_lobes(labels)                   # optional: small lobes (< min_area_um2) of one
                                                     # segmented nucleus made one cell; other
                                                     # regions < min_area_um2 dropped
    labels   = drop_thin(labels)                     # optional: strips narrower than min_width_um
    faint    = faint_nuclei(...)                     # optional, called by the analyzers: pale nuclei
                                                     # below the mask, by their local contrast
    centres  = core_centroids(labels)                # optional: centre of mass of each region's
                                                     # smoothed haematoxylin above
                                                     # centre_core_fraction x its maximum
    table    = per-label centroid, area_um2, eccentricity, solidity, h_od_mean, h_od_cv

The table is the stable interface (column names below); ``classify_nuclei`` turns it into
class names using sizes in µm² from the config.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.cluster.vq import kmeans2
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from marrowseg.analyzers import filters
from marrowseg.analyzers.distance import distance_to_background

__all__ = [
    "NUCLEUS_COLUMNS",
    "NUCLEUS_CLASSES",
    "gaussian_blur_torch",
    "NucleusMaps",
    "detect_nuclei",
    "detect_nuclei_from_centre_map",
    "nuclei_from_centres",
    "unseeded_components",
    "nuclear_mask",
    "core_centroids",
    "background_factor",
    "upsample_background",
    "split_by_shape",
    "split_by_area",
    "merge_megakaryocytes",
    "group_lobes",
    "drop_thin",
    "ellipse_width_um",
    "classify_nuclei",
    "empty_table",
    "label_measurements",
    "measure_labels",
    "fill_holes",
    "local_peaks",
    "gaussian_reference",
    "reference_maps",
    "faint_nuclei",
]

#: columns of the nucleus table, in order; row/col in pixels of the input, float64
NUCLEUS_COLUMNS = ("row", "col", "area_um2", "eccentricity", "solidity", "h_od_mean", "h_od_cv", "label")
#: class names returned by :func:`classify_nuclei`
NUCLEUS_CLASSES = ("late_erythroid", "megakaryocyte", "other")


def empty_table() -> dict[str, np.ndarray]:
    """A nucleus table with no rows and every column of :data:`NUCLEUS_COLUMNS`."""
    out = {c: np.zeros(0, np.float64) for c in NUCLEUS_COLUMNS}
    out["label"] = np.zeros(0, np.int32)
    return out


def gaussian_blur_torch(x: torch.Tensor, sigma_px: float, *, coarse_above_px: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, C, H, W)`` tensor, reflecting at the borders.

    Parameters
    ----------
    x : (B, C, H, W) float tensor
    sigma_px : float
        Standard deviation in pixels; 0 returns ``x`` unchanged. The kernel is truncated
        at ``ceil(3 sigma)``.
    coarse_above_px : float, optional
        For ``sigma_px`` above this, blur at a coarser grid: average-pool by an integer
        factor ``f`` (so the remaining sigma is about ``coarse_above_px``), blur there and
        upsample bilinearly. Use it only where a smooth approximation is fine (context maps).

    Returns
    -------
    (B, C, H, W) tensor of the same dtype.

    Notes
    -----
    Torch ``reflect`` mirrors about the edge pixel (scipy ``mode="mirror"``), unlike scipy's
    default ``reflect`` (about the pixel edge).
    """
    if sigma_px <= 0:
        return x
    if coarse_above_px is not None and sigma_px > coarse_above_px:
        f = int(sigma_px // coarse_above_px)
        h, w = x.shape[-2:]
        if f >= 2 and min(h, w) >= 4 * f:
            small = F.avg_pool2d(x, f, ceil_mode=True, count_include_pad=False)
            # box of width f adds (f^2 - 1) / 12 of variance in coarse... fine-pixel units
            rest = math.sqrt(max(sigma_px**2 - (f * f - 1) / 12.0, 0.25)) / f
            small = gaussian_blur_torch(small, rest)
            up = F.interpolate(small, scale_factor=float(f), mode="bilinear", align_corners=False)
            return up[..., :h, :w].contiguous()
    return filters.gaussian_blur(x, sigma_px)


def _background_sigma_px(mpp: float, cfg: Any) -> float | None:
    """Sigma of the local-background map in pixels, or None when the contrast test is off."""
    if getattr(cfg, "mask_contrast_od", None) is None:
        return None
    return float(cfg.mask_background_sigma_um) / float(mpp)


def background_factor(sigma_px: float) -> int:
    """Block size of the coarse grid the background map is computed on (sigma >= 4 coarse px).

    Why coarse: the map is smooth on the scale of several cells; a full-resolution blur of
    sigma 16 px costs about 1 s per 2048² tile on the CPU, the same blur on 4 x 4 block means
    a sixteenth of it. The blocks add (f² - 1) / 12 px² to the variance: 1.25 px² against
    256 px² for he.yaml's 8 µm at 0.5 µm/px.
    """
    return max(1, int(sigma_px // 4))


def upsample_background(background: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """The coarse background map of :class:`NucleusMaps` / :func:`reference_maps` on the full grid.

    Parameters
    ----------
    background : (ceil(H/f), ceil(W/f)) float32 ndarray
        Block-mean-then-blurred haematoxylin, f = :func:`background_factor` (``sigma_px``).
    shape : (H, W)
        The full-resolution tile shape.
    sigma_px : float
        The background sigma in full-resolution pixels.

    Returns
    -------
    (H, W) float32 ndarray
        Bilinear (cv2, pixel centres aligned: coarse pixel i is centred on fine (i + 0.5) f - 0.5).
    """
    f = background_factor(sigma_px)
    bg = np.asarray(background, np.float32)
    if f == 1:
        return bg
    up = cv2.resize(bg, (bg.shape[1] * f, bg.shape[0] * f), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(up[: shape[0], : shape[1]])


def _coarse_blur_reference(h_od: np.ndarray, sigma_px: float) -> np.ndarray:
    """SciPy twin of the module's coarse background: edge-padded f x f block means, then blurred."""
    f = background_factor(sigma_px)
    img = np.asarray(h_od, np.float32)
    if f > 1:
        h, w = img.shape
        img = np.pad(img, [(0, (-h) % f), (0, (-w) % f)], mode="edge")
        img = img.reshape(img.shape[0] // f, f, img.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)
    return gaussian_reference(img, sigma_px / f)


class NucleusMaps(torch.nn.Module):
    """Dense step of the classical detector: the smoothed haematoxylin maps.

    Input ``(B, 1, H, W)`` haematoxylin OD; output ``{"peak": ..., "mask": ...}``, same shape,
    and ``"background"`` (``h_od`` smoothed with ``mask_background_sigma_um``, on the coarse grid
    of :func:`background_factor`; :func:`upsample_background` brings it back) when
    ``mask_contrast_od`` is set.
    """

    def __init__(self, mpp: float, cfg: Any) -> None:
        super().__init__()
        self.peak_sigma_px = float(cfg.peak_sigma_um) / float(mpp)
        self.mask_sigma_px = float(cfg.mask_sigma_um) / float(mpp)
        self.background_sigma_px = _background_sigma_px(mpp, cfg)

    def forward(self, h_od: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {
            "peak": gaussian_blur_torch(h_od, self.peak_sigma_px),
            "mask": gaussian_blur_torch(h_od, self.mask_sigma_px),
        }
        if self.background_sigma_px is not None:
            f = background_factor(self.background_sigma_px)
            x = h_od
            if f > 1:
                h, w = x.shape[-2:]
                x = F.avg_pool2d(F.pad(x, (0, (-w) % f, 0, (-h) % f), mode="replicate"), f)
            out["background"] = gaussian_blur_torch(x, self.background_sigma_px / f)
        return out


def gaussian_reference(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """:func:`gaussian_blur_torch` in SciPy: ``mode="mirror"``, radius ``ceil(3 sigma)``, float32."""
    img = np.asarray(img, np.float32)
    if sigma_px <= 0:
        return img
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    return ndi.gaussian_filter(img, float(sigma_px), mode="mirror", radius=radius).astype(np.float32, copy=False)


def reference_maps(h_od: np.ndarray, mpp: float, cfg: Any) -> dict[str, np.ndarray]:
    """:class:`NucleusMaps` for one (H, W) image in SciPy: the same keys, (H, W) float32 arrays."""
    out = {
        "peak": gaussian_reference(h_od, float(cfg.peak_sigma_um) / float(mpp)),
        "mask": gaussian_reference(h_od, float(cfg.mask_sigma_um) / float(mpp)),
    }
    bg_sigma_px = _background_sigma_px(mpp, cfg)
    if bg_sigma_px is not None:
        out["background"] = _coarse_blur_reference(h_od, bg_sigma_px)
    return out


def _check_image(h_od: np.ndarray, name: str = "h_od") -> np.ndarray:
    a = np.asarray(h_od)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a (H, W) array, got shape {a.shape}")
    return a.astype(np.float32, copy=False)


def _smooth(h_od: np.ndarray, sigma_um: float, mpp: float) -> np.ndarray:
    s = float(sigma_um) / float(mpp)
    return ndi.gaussian_filter(h_od, s, mode="reflect") if s > 0 else h_od


def nuclear_mask(
    h_od: np.ndarray, mpp: float, cfg: Any, mask_map: np.ndarray, background_map: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear pixels: above ``mask_od`` and, optionally, above their surroundings, small holes filled.

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD (for the background map when ``background_map`` is omitted).
    mpp : float
        µm per pixel.
    cfg : NucleiConfig
        ``mask_od``; ``mask_contrast_od`` (null: no contrast test) and ``mask_background_sigma_um``;
        ``mask_fill_holes_um2`` (null: no filling).
    mask_map : (H, W) float32 ndarray
        ``h_od`` smoothed with ``mask_sigma_um``.
    background_map : (H, W) float32 ndarray, optional
        ``h_od`` smoothed with ``mask_background_sigma_um`` on the full grid (the module's
        coarse map through :func:`upsample_background`); computed so with scipy when omitted.

    Returns
    -------
    mask : (H, W) bool ndarray
        Nuclear pixels (both tests, holes up to ``mask_fill_holes_um2`` filled).
    filled : (H, W) bool ndarray
        ``mask`` with all its holes filled when the contrast test is on (else ``mask``): the
        mask the megakaryocyte merge looks at.

    Notes
    -----
    Why a contrast test: the haematoxylin OD of cytoplasm and stroma depends on the lab and
    the section (MoNuSeg tiles: non-nuclear median 0.11-0.29 OD, 10-48 % of it above 0.3),
    so an absolute threshold alone takes dark cytoplasm for nuclei and lets nuclear regions
    run into it. A nucleus is denser than its surroundings on the scale of a few cells;
    ``mask_background_sigma_um`` is that scale. A nucleus much wider than that scale (a
    megakaryocyte) reads as its own background inside and fails the test there, while its rim
    passes; so the megakaryocyte merge looks at ``filled``, the mask with its holes filled
    (not at the absolute threshold: in a heavily stained section that is one sheet, and the
    merge would join every nucleus in it). The edge of a dark sheet against pale tissue passes
    the contrast test too.

    Why small holes are filled: a nucleus is one solid body, but the pale nucleoplasm of an
    open-chromatin (vesicular) nucleus can fall below either threshold. A region with a hole
    has a low solidity and a ring of distance-to-edge maxima, so :func:`split_by_shape` cuts
    one nucleus into pieces at "waists" that are only the hole (on mbm-dev this is the whole
    effect: without the split, filling changes nothing). Holes larger than
    ``mask_fill_holes_um2`` are gaps between cells (a ring of erythroblasts round a
    macrophage) and stay open.
    """
    mask = mask_map > np.float32(cfg.mask_od)
    contrast = getattr(cfg, "mask_contrast_od", None)
    if contrast is not None:
        if background_map is None:
            sigma_px = float(cfg.mask_background_sigma_um) / float(mpp)
            background_map = upsample_background(_coarse_blur_reference(h_od, sigma_px), h_od.shape, sigma_px)
        else:
            background_map = _check_image(background_map, "background_map")
        if background_map.shape != mask_map.shape:
            raise ValueError(f"background_map {background_map.shape} differs from mask_map {mask_map.shape}")
        mask &= mask_map > background_map + np.float32(contrast)
    fill_um2 = getattr(cfg, "mask_fill_holes_um2", None)
    if fill_um2 is None and contrast is None:
        return mask, mask
    max_size = None if fill_um2 is None else int(float(fill_um2) / float(mpp) ** 2)
    mask, filled = fill_holes(mask, max_size)
    return (mask, mask) if contrast is None else (mask, filled)


def fill_holes(mask: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Small holes filled, and all holes filled, from one labelling of the background.

    Parameters
    ----------
    mask : (H, W) bool ndarray
    max_size : int or None
        Holes (4-connected background components, those on the border included) of at most
        this many pixels are filled; None fills none.

    Returns
    -------
    small_filled : (H, W) bool ndarray
        ``skimage.morphology.remove_small_holes(mask, max_size=max_size)`` (``mask`` for None).
    all_filled : (H, W) bool ndarray
        ``scipy.ndimage.binary_fill_holes(small_filled)``: every background component that
        does not touch the border is filled. SciPy floods the background from the border one
        pixel per iteration, a fifth of a second on a 2048² tile.
    """
    holes, _ = ndi.label(~mask)  # 4-connected, as both library functions
    size = np.bincount(holes.ravel())
    small = np.zeros(len(size), bool)
    if max_size is not None:
        small = size <= max_size  # remove_small_holes keeps its max_size inclusive
        small[0] = False
        mask = mask | small[holes]
    else:
        mask = mask.copy()
    outside = np.zeros(len(size), bool)
    for edge in (holes[0], holes[-1], holes[:, 0], holes[:, -1]):
        outside[edge] = True
    outside[0] = False
    outside &= ~small  # a small hole on the border is already filled
    return mask, ~outside[holes]


def detect_nuclei(
    h_od: np.ndarray,
    mpp: float,
    cfg: Any,
    *,
    peak_map: np.ndarray | None = None,
    mask_map: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    background_map: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Detect and segment nuclei in a haematoxylin OD image (classical detector).

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin optical density (or concentration), 0 where unstained.
    mpp : float
        Pixel size, µm per pixel (> 0).
    cfg : NucleiConfig
        ``peak_sigma_um``, ``min_distance_um``, ``min_peak_od``, ``mask_sigma_um``,
        ``mask_od``, ``min_area_um2``; ``seed_unseeded`` (a seed for every mask component
        of a nucleus's size that has none: :func:`unseeded_components`); ``mask_contrast_od`` (null: no contrast test),
        ``mask_background_sigma_um`` and ``mask_fill_holes_um2`` for :func:`nuclear_mask`; ``split_max_solidity`` (null: no split),
        ``split_min_area_um2``, ``split_h_um`` for :func:`split_by_shape`;
        ``megakaryocyte_min_radius_um`` (null: no merge), ``megakaryocyte_core_radius_um``,
        ``megakaryocyte_core_min_area_um2`` for :func:`merge_megakaryocytes`;
        ``centre_core_fraction`` (null: the whole region's centroid) for :func:`core_centroids`
        (weighted: the centre of mass of the excess over that fraction of the maximum);
        ``clump_nucleus_area_um2`` (absent or null: no area split) and ``clump_max_solidity``
        for :func:`split_by_area` (with ``split_max_area_um2`` as its upper limit);
        ``lobe_max_gap_um`` (null: regions below ``min_area_um2`` dropped) and
        ``lobe_max_extent_um`` for :func:`group_lobes`; ``min_width_um`` (null: no width test)
        for :func:`drop_thin`.
    peak_map, mask_map : (H, W) float32 ndarray, optional
        ``h_od`` smoothed with ``peak_sigma_um`` / ``mask_sigma_um`` (the torch module
        computes them on the device); computed here with scipy when omitted.
    allowed : (H, W) bool ndarray, optional
        Centres outside it are ignored (e.g. only haematopoietic tissue).
    background_map : (H, W) float32 ndarray, optional
        ``h_od`` smoothed with ``mask_background_sigma_um`` on the full grid (used only with
        ``mask_contrast_od``; see :func:`nuclear_mask`); computed here with scipy when omitted.
    mask : (H, W) bool ndarray, optional
        Nuclear pixels from elsewhere (the learned mask net, ``he.nuclei.mask_net``) in place
        of :func:`nuclear_mask`'s thresholds (the megakaryocyte merge still looks at theirs).

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background, 1..N nuclei (label ``table["label"][i]`` is row i).
    table : dict of str to (N,) ndarray
        Columns :data:`NUCLEUS_COLUMNS`; ``row``/``col`` are the region's (or its dense core's)
        centroid in pixels, ``area_um2`` in µm², ``h_od_mean``/``h_od_cv`` of ``h_od`` in the region.
    """
    h_od = _check_image(h_od)
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    peak = _smooth(h_od, cfg.peak_sigma_um, mpp) if peak_map is None else _check_image(peak_map, "peak_map")
    maskm = _smooth(h_od, cfg.mask_sigma_um, mpp) if mask_map is None else _check_image(mask_map, "mask_map")
    if peak.shape != h_od.shape or maskm.shape != h_od.shape:
        raise ValueError(f"peak/mask maps {peak.shape}/{maskm.shape} differ from h_od {h_od.shape}")
    if mask is None:
        mask, filled = nuclear_mask(h_od, mpp, cfg, maskm, background_map)
    else:
        mask = np.asarray(mask, bool)
        if mask.shape != h_od.shape:
            raise ValueError(f"mask {mask.shape} differs from h_od {h_od.shape}")
        # a megakaryocyte is still found as one dense mass of the thresholded, hole-filled mask
        # (a learned mask cuts it into lobes: phantom megakaryocytes 3 -> 0 of 3 on that mask)
        _, filled = nuclear_mask(h_od, mpp, cfg, maskm, background_map)
    min_dist_px = max(1, int(round(float(cfg.min_distance_um) / mpp)))
    search = mask if allowed is None else (mask & allowed)
    if not search.any():
        return np.zeros(h_od.shape, np.int32), empty_table()
    relief = peak
    threshold = float(cfg.min_peak_od)
    seedable = search
    if getattr(cfg, "seeds", "peaks") == "distance":
        # touching and overlapping nuclei: one seed per maximum of the distance to the
        # nuclear boundary (µm), tie-broken by the smoothed haematoxylin; the haematoxylin
        # threshold still applies to every seed
        dist_um = distance_to_background(mask) * np.float32(mpp)
        relief = dist_um + np.float32(cfg.distance_od_weight_um) * peak
        # no early exit without seeds: lobes too small to hold one are still grouped below
        search = search & (peak >= threshold) & (dist_um >= np.float32(cfg.min_radius_um))
        threshold = float(cfg.min_radius_um)
    centres = local_peaks(relief, min_dist_px, threshold, search)
    if getattr(cfg, "seed_unseeded", False):
        extra = unseeded_components(mask, seedable, relief, centres, float(cfg.min_area_um2) / float(mpp) ** 2)
        centres = np.concatenate([centres, extra]) if len(extra) else centres
    lobe_gap_um = getattr(cfg, "lobe_max_gap_um", None)
    # with lobe grouping the regions below min_area_um2 are kept until the lobes among them
    # are grouped (after the split and the merge, which never act on regions that small)
    min_area_um2 = float(cfg.min_area_um2) if lobe_gap_um is None else 0.0
    labels, table = nuclei_from_centres(h_od, mpp, centres, relief, mask, min_area_um2=min_area_um2)
    max_solidity = getattr(cfg, "split_max_solidity", None)
    if max_solidity is not None and len(table["label"]):
        labels, table = split_by_shape(
            h_od, mpp, labels, table,
            min_area_um2=float(cfg.split_min_area_um2),
            max_solidity=float(max_solidity),
            h_um=float(cfg.split_h_um),
            keep_area_um2=float(cfg.min_area_um2),
            max_area_um2=getattr(cfg, "split_max_area_um2", None),
        )
    mk_radius_um = getattr(cfg, "megakaryocyte_min_radius_um", None)
    if mk_radius_um is not None and len(table["label"]):
        labels, table = merge_megakaryocytes(
            h_od, mpp, filled, labels, table,
            min_radius_um=float(mk_radius_um),
            core_radius_um=float(cfg.megakaryocyte_core_radius_um),
            min_area_um2=float(cfg.megakaryocyte_core_min_area_um2),
            max_od_cv=getattr(cfg, "megakaryocyte_merge_max_od_cv", None),
        )
    clump_area_um2 = getattr(cfg, "clump_nucleus_area_um2", None)
    if clump_area_um2 is not None and len(table["label"]):
        labels, table = split_by_area(
            h_od, mpp, labels, table,
            nucleus_area_um2=float(clump_area_um2),
            max_solidity=getattr(cfg, "clump_max_solidity", None),
            max_area_um2=getattr(cfg, "split_max_area_um2", None),
        )
    first_grouped = None  # label ids from here on are groups of lobes
    if lobe_gap_um is not None:
        first_grouped = int(labels.max()) + 1
        labels, table = group_lobes(
            h_od, mpp, mask, labels, table,
            min_area_um2=float(cfg.min_area_um2),
            max_gap_um=float(lobe_gap_um),
            max_extent_um=float(cfg.lobe_max_extent_um),
            allowed=allowed,
        )

    def grouped() -> np.ndarray | None:
        return None if first_grouped is None else table["label"] >= first_grouped

    min_width_um = getattr(cfg, "min_width_um", None)
    if min_width_um is not None and len(table["label"]):
        # a group of lobes is not one ellipse: its width says nothing
        labels, table = drop_thin(labels, table, float(min_width_um), exempt=grouped())
    core_fraction = getattr(cfg, "centre_core_fraction", None)
    if core_fraction is not None and len(table["label"]):
        # a group of lobes keeps the centroid of all its lobes (its densest lobe is off centre)
        # weighted by the excess over the core threshold (see core_centroids): chosen over the
        # plain core centroid in every mbm-dev leave-one-patient-out fold
        table = core_centroids(labels, table, maskm, float(core_fraction), exempt=grouped(), weighted=True)
    return labels, table


def local_peaks(image: np.ndarray, min_distance: int, threshold: float, search: np.ndarray) -> np.ndarray:
    """``peak_local_max(image, min_distance=min_distance, threshold_abs=threshold,
    labels=search.astype(np.uint8), exclude_border=False)``, the same coordinates in the same order.

    scikit-image thins the candidates with a Python loop over every peak (``ensure_spacing``:
    greedy in order of decreasing height, Chebyshev distance ``< min_distance``), a third of a
    second on a 2048² tile of marrow. Here the candidates come from ``peak_local_max`` without
    the thinning (``min_distance=1`` and the same square footprint) and only the peaks that have
    a neighbour that close go through the greedy loop: two such peaks are each the maximum of a
    window that holds the other, so they are equal (a plateau), which is rare.

    Returns
    -------
    (N, 2) intp ndarray of (row, col).
    """
    size = 2 * int(min_distance) + 1
    coords = _peak_candidates(image, size, threshold, search)
    if min_distance <= 1 or len(coords) < 2:
        return coords
    # integer coordinates: Chebyshev distance < min_distance <=> <= min_distance - 1
    pairs = cKDTree(coords).query_pairs(min_distance - 0.5, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return coords
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # i < j, grouped by i
    rejected = np.zeros(len(coords), bool)
    heads, first = np.unique(pairs[:, 0], return_index=True)
    stops = np.append(first[1:], len(pairs))
    for i, a, b in zip(heads.tolist(), first.tolist(), stops.tolist(), strict=True):
        if not rejected[i]:  # kept: it removes every later peak that close
            rejected[pairs[a:b, 1]] = True
    return coords[~rejected]


def unseeded_components(
    mask: np.ndarray, search: np.ndarray, relief: np.ndarray, centres: np.ndarray, min_area_px: float,
) -> np.ndarray:
    """One seed for each nuclear-mask component that holds none and is a nucleus's size.

    The seed rules (a smoothed-OD threshold, a depth inside the mask, one maximum per
    ``min_distance``) miss small or thin nuclei whose smoothed haematoxylin stays under the
    threshold: a neutrophil lobe 2.5 µm wide, a pale myelocyte. Without a seed their pixels are
    grown into no region, so a component that the mask found and that is at least a nucleus's
    area is lost whole. Its seed is its highest ``relief`` inside ``search``.

    Parameters
    ----------
    mask : (H, W) bool ndarray
        Nuclear pixels (8-connected components).
    search : (H, W) bool ndarray
        Where a seed may lie (the mask within the allowed tissue).
    relief : (H, W) float ndarray
        The seeds' map; the new seed is its maximum over the component's ``search`` pixels.
    centres : (N, 2) int ndarray
        The seeds already found, (row, col).
    min_area_px : float
        Smaller components are left to the lobe grouping or dropped, px.

    Returns
    -------
    (M, 2) intp ndarray
        New seeds, (row, col), one per component, in the order of OpenCV's component labels.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    _, comp, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    orphan = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    orphan[0] = False
    if len(centres):
        orphan[comp[centres[:, 0], centres[:, 1]]] = False
    if not orphan.any():
        return np.empty((0, 2), np.intp)
    idx = np.flatnonzero(orphan[comp.ravel()] & np.asarray(search, bool).ravel())
    if not len(idx):
        return np.empty((0, 2), np.intp)
    cid = comp.ravel()[idx]
    # per component the highest relief, the first pixel in raster order among equals; sorting
    # only the orphans' pixels (ndi.maximum_position scans the whole tile: 0.46 vs 0.03 s for a
    # dozen orphans on a 2,048² tile)
    order = np.lexsort((idx, -relief.ravel()[idx], cid))
    first = order[np.r_[True, cid[order][1:] != cid[order][:-1]]]
    return np.column_stack(np.divmod(idx[first], mask.shape[1])).astype(np.intp)


def _peak_candidates(image: np.ndarray, size: int, threshold: float, search: np.ndarray) -> np.ndarray:
    """``peak_local_max(image, min_distance=1, footprint=np.ones((size, size)), threshold_abs=threshold,
    labels=search.astype(np.uint8), exclude_border=False)``: its steps, with OpenCV's maximum filter.

    A rectangular dilation with replicated borders is SciPy's ``maximum_filter(mode="nearest")``
    to the bit, about five times faster on a 2,048² tile. The rare image whose search region is
    one plateau (scikit-image's special case) and dtypes OpenCV does not dilate go to scikit-image.
    """
    search = np.asarray(search, bool)
    rows, cols = np.flatnonzero(search.any(axis=1)), np.flatnonzero(search.any(axis=0))
    if image.dtype not in (np.float32, np.float64) or size < 3:
        return peak_local_max(image, min_distance=1, footprint=np.ones((size, size), bool), threshold_abs=threshold,
                              labels=search.astype(np.uint8), exclude_border=False)
    if not len(rows):
        return np.empty((0, 2), np.intp)
    roi = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    inside = search[roi]
    img = image[roi].copy()
    img[~inside] = np.finfo(image.dtype).min
    top = cv2.dilate(img, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)
    out = img == top
    if out[inside].all():
        return peak_local_max(image, min_distance=1, footprint=np.ones((size, size), bool), threshold_abs=threshold,
                              labels=search.astype(np.uint8), exclude_border=False)
    out &= img > threshold
    coord = np.nonzero(out)
    order = np.argsort(-img[coord], kind="stable")  # highest first, raster order among equals
    coord = np.transpose(coord)[order]
    coord[:, 0] += rows[0]
    coord[:, 1] += cols[0]
    return coord


def core_centroids(
    labels: np.ndarray, table: dict[str, np.ndarray], density: np.ndarray, fraction: float,
    *, exempt: np.ndarray | None = None, weighted: bool = False,
) -> dict[str, np.ndarray]:
    """``table`` with each nucleus's ``row``/``col`` moved to the centroid of its dense core.

    Parameters
    ----------
    labels : (H, W) int32 ndarray
        Nuclei, 0 background (as from :func:`detect_nuclei`).
    table : dict of str to (N,) ndarray
        Their measurements; only ``row`` and ``col`` change.
    density : (H, W) float32 ndarray
        Smoothed haematoxylin (the detector's mask map), OD.
    fraction : float
        The core is the region's pixels with ``density >= fraction x`` the region's maximum.
    exempt : (N,) bool ndarray, optional
        Rows that keep their ``row``/``col`` (e.g. a group of lobes, whose centre is between them).
    weighted : bool
        Weight each core pixel by its excess over the core threshold
        (``density - fraction x maximum``, OD) instead of counting every core pixel once.

    Returns
    -------
    dict of str to (N,) ndarray
        A new table; areas and densities are those of the whole region.

    Notes
    -----
    Why: the watershed region runs to the mask's edge, and where a nucleus touches dark
    cytoplasm or a neighbour's rim the region grows a pale tail that pulls its centroid off
    the nucleus; the dense core (like a full width at half maximum) is where the chromatin is.
    Weighted, the centre is the centre of mass of the chromatin above the threshold: a core
    that still reaches a neighbour's rim or a dark strip of cytoplasm holds only the faint
    skirt of it, which then weighs little.
    """
    n = int(labels.max())
    # per-label maximum: ufunc.at is ~30x faster than ndi.maximum with thousands of labels
    # (over the labelled pixels only, in raster order as np.nonzero)
    idx = np.flatnonzero(labels)
    lab = labels.ravel()[idx]
    peak = np.full(n + 1, -np.inf, np.float32)
    np.maximum.at(peak, lab, np.asarray(density, np.float32).ravel()[idx])
    excess = np.asarray(density, np.float32).ravel()[idx] - np.float32(fraction) * peak[lab]
    core = excess >= 0
    idx, lab = idx[core], lab[core]
    rr, cc = np.divmod(idx, labels.shape[1])
    # weights: 1 per core pixel, or its excess (the maximum itself has excess 0 when fraction
    # is 1: a floor keeps every core pixel in)
    w = np.maximum(excess[core].astype(np.float64), 1e-6) if weighted else np.ones(len(idx))
    cnt = np.bincount(lab, weights=w, minlength=n + 1)
    ids = table["label"]
    ok = cnt[ids] > 0
    if exempt is not None:
        ok &= ~np.asarray(exempt, bool)
    out = dict(table)
    safe = np.where(cnt[ids] > 0, cnt[ids], 1.0)
    out["row"] = np.where(ok, np.bincount(lab, weights=w * rr, minlength=n + 1)[ids] / safe, table["row"])
    out["col"] = np.where(ok, np.bincount(lab, weights=w * cc, minlength=n + 1)[ids] / safe, table["col"])
    return out


def ellipse_width_um(table: dict[str, np.ndarray]) -> np.ndarray:
    """Minor axis of each nucleus, µm: that of the ellipse with its area and eccentricity.

    An ellipse of semi-axes a >= b has area pi a b and eccentricity sqrt(1 - b²/a²), so
    2 b = 2 sqrt(area sqrt(1 - e²) / pi).
    """
    e = np.clip(np.asarray(table["eccentricity"], np.float64), 0.0, 1.0)
    area = np.asarray(table["area_um2"], np.float64)
    return 2.0 * np.sqrt(area * np.sqrt(1.0 - e * e) / np.pi)


def drop_thin(
    labels: np.ndarray, table: dict[str, np.ndarray], min_width_um: float, *, exempt: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Drop regions narrower than ``min_width_um`` (:func:`ellipse_width_um`), pixels and rows.

    Rows where ``exempt`` (bool, one per row) is True are kept whatever their width.

    Why: a strip of dark stroma or a cytoplasmic rim along a sheet's edge passes the contrast
    test as a band 1.5-2.5 µm wide; the narrowest nuclei (a pyknotic normoblast, a lymphocyte,
    the body of a spindle-cell nucleus) are about 2.5 µm wide or more.
    """
    thin = ellipse_width_um(table) < float(min_width_um)
    if exempt is not None:
        thin &= ~np.asarray(exempt, bool)
    if not thin.any():
        return labels, table
    lut = np.ones(int(labels.max()) + 1, bool)
    lut[table["label"][thin]] = False
    lut[0] = True
    out = np.where(lut[labels], labels, 0).astype(np.int32)
    return out, {c: v[~thin] for c, v in table.items()}


def group_lobes(
    h_od: np.ndarray,
    mpp: float,
    mask: np.ndarray,
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    *,
    min_area_um2: float,
    max_gap_um: float,
    max_extent_um: float,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Make the separate small lobes of one segmented nucleus one cell; drop other small regions.

    A segmented neutrophil's nucleus is 2-5 lobes (each ~2-3 µm across) joined by chromatin
    threads too thin for the nuclear mask, around a pale centre where the cell's centre lies.
    Each lobe alone is below ``min_area_um2`` (and often too small to hold a peak seed), so
    it would be dropped as debris. Here the lobe candidates are the regions below
    ``min_area_um2`` and the parts of the nuclear mask that no seed reached, each below
    ``min_area_um2``; candidates at most ``max_gap_um`` apart are grouped. A group of at least
    two candidates, together at least ``min_area_um2`` and at most ``max_extent_um`` across
    (row or column extent: one cell's nucleus), whose centroid lies in ``allowed``, becomes
    one region (the lobes' pixels; its centroid falls between them). Every other region below
    ``min_area_um2`` is dropped, as :func:`nuclei_from_centres` would have done.

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD, for the density columns of the grouped regions.
    mpp : float
        µm per pixel.
    mask : (H, W) bool ndarray
        The nuclear mask the regions were grown in.
    labels, table
        Regions and their measurements with no minimum area (``nuclei_from_centres(...,
        min_area_um2=0)``).
    min_area_um2 : float
        Regions smaller than this are lobes or debris, µm².
    max_gap_um : float
        Largest gap between two lobes of one nucleus, µm (the candidates are grown by half
        of it, rounded to whole pixels, and those that touch are grouped).
    max_extent_um : float
        Largest row or column extent of a grouped nucleus, µm.
    allowed : (H, W) bool ndarray, optional
        Where a cell centre may lie (as the detector's seeds).

    Returns
    -------
    labels, table
        As :func:`detect_nuclei`; grouped regions get new ids above the largest input id
        and their rows come last.

    Notes
    -----
    Only pixels that would otherwise carry no nucleus take part, so a region at least
    ``min_area_um2`` large is never changed; a lone small candidate is still dropped.
    """
    px_um2 = float(mpp) ** 2
    small = (table["area_um2"] < min_area_um2) & (table["area_um2"] > 0)
    big_rows = ~small & (table["area_um2"] > 0)
    lut = np.zeros(int(labels.max()) + 1, bool)
    lut[table["label"][small]] = True
    # candidates: small seeded regions, and the mask components that hold no seed (the
    # watershed floods every component that holds one)
    small_px = lut[labels]
    cand = small_px | (np.asarray(mask, bool) & (labels == 0))
    if not cand.any():
        return _replace_regions(labels, table, small_px, big_rows, np.zeros_like(labels), empty_table())
    w = labels.shape[1]
    # two small seeded regions may touch (one mask component cut by the watershed): one candidate.
    # Lobe ids only say which pixels belong together (OpenCV's numbering is as good as SciPy's);
    # from here on the work is on the candidates' pixels (raster order), not the tile.
    cand = np.ascontiguousarray(cand)
    n_lobes, lobes = cv2.connectedComponents(cand.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    n_lobes -= 1
    cidx = np.flatnonzero(cand)
    lob = lobes.ravel()[cidx]
    is_lobe = np.bincount(lob, minlength=n_lobes + 1) * px_um2 < min_area_um2
    is_lobe[0] = False
    keep = is_lobe[lob]
    iidx, ilob = cidx[keep], lob[keep]  # the lobes' pixels
    r_px = max(1, int(round(0.5 * float(max_gap_um) / float(mpp))))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_px + 1, 2 * r_px + 1))
    seeds = np.zeros(labels.shape, np.uint8)
    seeds.ravel()[iidx] = 1
    grown = cv2.dilate(seeds, disk).astype(bool)
    # group ids become region ids (and row order): SciPy's raster-order numbering
    groups, n_groups = ndi.label(grown, structure=np.ones((3, 3), bool))
    g_px = groups.ravel()[iidx]
    lobe_group = np.zeros(n_lobes + 1, np.int64)
    lobe_group[ilob] = g_px
    n_in = np.bincount(lobe_group[np.flatnonzero(is_lobe)], minlength=n_groups + 1)
    cnt = np.bincount(g_px, minlength=n_groups + 1).astype(np.float64)
    # row or column extent of each group's lobes (their bounding box, not the grown one)
    rr, cc = np.divmod(iidx, w)
    lo_r = np.full(n_groups + 1, np.iinfo(np.intp).max, np.intp)
    lo_c = lo_r.copy()
    hi_r = np.full(n_groups + 1, -1, np.intp)
    hi_c = hi_r.copy()
    np.minimum.at(lo_r, g_px, rr)
    np.minimum.at(lo_c, g_px, cc)
    np.maximum.at(hi_r, g_px, rr)
    np.maximum.at(hi_c, g_px, cc)
    extent = np.where(hi_r >= 0, np.maximum(hi_r - lo_r + 1, hi_c - lo_c + 1), 0).astype(np.float64) * float(mpp)
    ok = (n_in >= 2) & (cnt * px_um2 >= min_area_um2) & (extent <= max_extent_um)
    ok[0] = False
    if allowed is not None and ok.any():
        safe = np.maximum(cnt, 1.0)
        gr = np.round(np.bincount(g_px, weights=rr, minlength=n_groups + 1) / safe).astype(np.intp)
        gc = np.round(np.bincount(g_px, weights=cc, minlength=n_groups + 1) / safe).astype(np.intp)
        ok &= np.asarray(allowed, bool)[gr, gc]
    merged = np.zeros(labels.shape, np.int32)
    sel = ok[g_px]
    merged.ravel()[iidx[sel]] = g_px[sel]
    g_labels, g_table = measure_labels(merged, h_od, mpp, 0.0)
    return _replace_regions(labels, table, small_px, big_rows, g_labels, g_table)


def merge_megakaryocytes(
    h_od: np.ndarray,
    mpp: float,
    mask: np.ndarray,
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    *,
    min_radius_um: float,
    core_radius_um: float,
    min_area_um2: float,
    max_od_cv: float | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Make each megakaryocyte nucleus one region again.

    The peak seeds of :func:`detect_nuclei` are spaced for the 4-12 µm nuclei of the other
    marrow cells, so a lobulated megakaryocyte nucleus (20-50 µm) comes out as a dozen
    fragments. Here the nuclear mask is looked at on the coarser scale of a megakaryocyte:
    its opening by a disk of radius ``core_radius_um`` keeps the solid body of large nuclei
    and drops the necks between touching small ones. A connected part of that opening is a
    megakaryocyte core when it is at least ``min_area_um2`` large and holds a disk of radius
    ``min_radius_um`` inside the mask (no other marrow nucleus is that wide). The detected
    nuclei whose centroid lies in a core are replaced by one region: those nuclei and the
    core pixels that no other nucleus holds (other nuclei keep their pixels and rows).

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD, for the density columns of the merged regions.
    mpp : float
        µm per pixel.
    mask : (H, W) bool ndarray
        Nuclear pixels (the detector's ``mask_map > mask_od``).
    labels, table
        As returned by :func:`detect_nuclei`.
    min_radius_um : float
        Radius of the largest disk inside the mask that a megakaryocyte nucleus holds, µm.
    core_radius_um : float
        Radius of the opening disk, µm: necks narrower than twice this are cut.
    min_area_um2 : float
        Smallest core, µm².
    max_od_cv : float, optional
        A merged region whose haematoxylin std/mean is above this is not one even nucleus
        (a clump of dark nuclei with gaps): its nuclei are left as they were.

    Returns
    -------
    labels, table
        As :func:`detect_nuclei`; unchanged when there is no core. Merged regions get new
        ids above the largest input id and their rows come last.

    Notes
    -----
    A tile without a point that deep in the mask pays one erosion (:func:`_deep_pixels`);
    otherwise the mask's components are labelled and the opening is done per
    component that holds such a point. Real megakaryocyte nuclei with thin, separate lobes
    (~8 µm wide) hold no such disk and stay in pieces.
    """
    mask = np.asarray(mask, bool)
    deep = _deep_pixels(mask, np.float32(min_radius_um / float(mpp)))
    if not deep.any():
        return labels, table
    comp, _ = ndi.label(mask)
    objs = ndi.find_objects(comp)
    r_px = max(1, int(round(core_radius_um / float(mpp))))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_px + 1, 2 * r_px + 1))
    px_um2 = float(mpp) ** 2
    rows = np.clip(np.round(table["row"]).astype(np.intp), 0, labels.shape[0] - 1)
    cols = np.clip(np.round(table["col"]).astype(np.intp), 0, labels.shape[1] - 1)
    cores = np.zeros(labels.shape, np.int32)
    n_cores = 0
    for cid in np.unique(comp[deep]):
        sl = objs[int(cid) - 1]
        # margin of the disk so that the opening sees the component's edge
        r0, r1 = max(sl[0].start - r_px, 0), min(sl[0].stop + r_px, labels.shape[0])
        c0, c1 = max(sl[1].start - r_px, 0), min(sl[1].stop + r_px, labels.shape[1])
        reg = (comp[r0:r1, c0:c1] == cid).astype(np.uint8)
        opened = cv2.morphologyEx(reg, cv2.MORPH_OPEN, disk).astype(bool)
        parts, n = ndi.label(opened)
        if n == 0:
            continue
        ids = np.arange(1, n + 1)
        area_um2 = np.bincount(parts.ravel(), minlength=n + 1)[1:] * px_um2
        has_deep = np.asarray(ndi.maximum(deep[r0:r1, c0:c1], parts, ids), bool)
        view = cores[r0:r1, c0:c1]
        for k in ids[(area_um2 >= min_area_um2) & has_deep]:
            n_cores += 1
            view[parts == k] = n_cores
    if n_cores == 0:
        return labels, table
    owner = cores[rows, cols]
    merged = owner > 0
    if not merged.any():
        return labels, table
    # each core's region: the nuclei centred in it and the core pixels no other nucleus holds
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[table["label"][merged]] = owner[merged]
    joined = lut[labels]
    free = (cores > 0) & (labels == 0)
    joined[free] = cores[free]
    m_labels, m_table = measure_labels(joined, h_od, mpp, 0.0)
    if max_od_cv is not None:
        uneven = m_table["h_od_cv"] > max_od_cv
        if uneven.all():
            return labels, table
        if uneven.any():
            bad = m_table["label"][uneven]
            merged &= ~np.isin(owner, bad)
            joined[np.isin(joined, bad)] = 0
            m_labels[np.isin(m_labels, bad)] = 0
            m_table = {c: v[~uneven] for c, v in m_table.items()}
    return _replace_regions(labels, table, joined > 0, ~merged, m_labels, m_table)


def _deep_pixels(mask: np.ndarray, radius_px: np.float32) -> np.ndarray:
    """``distance_to_background(mask) >= radius_px``, with an early exit for tiles without such a pixel.

    A pixel that deep has no background within Chebyshev distance ``k`` (``k sqrt 2 < radius``),
    so it survives an erosion by that square (separable, a few ms a tile): most tiles hold no
    megakaryocyte and stop there without a distance transform.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    k = int(math.floor((float(radius_px) - 1e-3) / math.sqrt(2.0)))
    if k >= 1 and mask.size and not mask.all():
        # outside the image is not background (as for the distance): the border never erodes
        near = cv2.erode(mask.view(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8),
                         borderType=cv2.BORDER_CONSTANT, borderValue=1)
        if not near.any():
            return np.zeros(mask.shape, bool)
    return distance_to_background(mask) >= radius_px


def split_by_shape(
    h_od: np.ndarray,
    mpp: float,
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    *,
    min_area_um2: float,
    max_solidity: float,
    h_um: float,
    keep_area_um2: float,
    max_area_um2: float | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split segmented nuclei whose shape says they are several overlapping nuclei.

    A region is a candidate when it is large (``area_um2 >= min_area_um2``) and not convex
    (``solidity <= max_solidity``): two overlapping round nuclei make a waist that one
    nucleus does not have. Inside each candidate, the distance to the region's edge (µm)
    has one maximum per overlapping disk; maxima that rise at least ``h_um`` above the
    saddle between them (h-maxima) are the new seeds, and the region is cut along the
    watershed of the negated distance. A candidate with one such maximum is kept whole.

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD, for the density columns of the new regions.
    mpp : float
        µm per pixel.
    labels : (H, W) int32 ndarray
        Nuclei, 0 background; ``table["label"]`` lists the ids in use.
    table : dict of str to (N,) ndarray
        Measurements of ``labels`` (:data:`NUCLEUS_COLUMNS`).
    min_area_um2 : float
        Smaller regions are never split, µm².
    max_solidity : float
        Regions more solid than this are never split (pixels / convex-hull pixels).
    h_um : float
        Depth of the waist, µm: how far the distance-to-edge of each part must rise above
        that at the neck.
    keep_area_um2 : float
        Parts smaller than this after the split are dropped, µm² (the detector's
        ``min_area_um2``).
    max_area_um2 : float, optional
        Larger regions are never split, µm² (a lobulated megakaryocyte nucleus is one cell).

    Returns
    -------
    labels, table
        As :func:`detect_nuclei`; unchanged when no region is split.

    Notes
    -----
    Work is per candidate bounding box, so the cost grows with the number of candidates,
    not with the tile. Split parts get new ids above the largest input id and their rows
    come last, so label ids are unique but not contiguous. Two disks of radius r whose
    centres are d apart have a neck of half-width sqrt(r^2 - d^2/4): for r = 5 µm,
    d = 6 µm the neck is 1 µm shallower than the centres. The boxes are processed together
    on one packed canvas (:func:`_split_boxes_packed`: the same result as box by box, about
    three times faster on a crowded tile).
    """
    cand = (table["area_um2"] >= min_area_um2) & (table["solidity"] <= max_solidity)
    if max_area_um2 is not None:
        cand &= table["area_um2"] <= max_area_um2
    if not cand.any():
        return labels, table
    objs = ndi.find_objects(labels)
    h_img, w_img = labels.shape
    boxes = []  # (label, r0, r1, c0, c1): the region's bounding box and one pixel of margin
    for lab_id in table["label"][cand].tolist():
        sl = objs[int(lab_id) - 1]
        if sl is None:
            continue
        # one pixel of margin so that the distance is measured to the region's edge
        boxes.append((int(lab_id), max(sl[0].start - 1, 0), min(sl[0].stop + 1, h_img),
                      max(sl[1].start - 1, 0), min(sl[1].stop + 1, w_img)))
    # a box cut by the tile's edge has no margin there (SciPy's distance does not count the
    # array's edge as background): the canvas gives it a ring of background on that side
    # and its own distance
    open_sides = [(int(objs[b[0] - 1][0].start == 0), int(objs[b[0] - 1][0].stop == h_img),
                   int(objs[b[0] - 1][1].start == 0), int(objs[b[0] - 1][1].stop == w_img)) for b in boxes]
    found = _split_boxes_packed(labels, boxes, float(mpp), float(h_um), open_sides)
    parts_img = np.zeros(labels.shape, np.int32)
    n_parts = 0
    split_ids = []
    for (lab_id, r0, r1, c0, c1), got in zip(boxes, found, strict=True):
        if got is None:
            continue
        reg, part, n = got
        view = parts_img[r0:r1, c0:c1]
        view[reg] = part[reg] + n_parts
        n_parts += n
        split_ids.append(lab_id)
    if not split_ids:
        return labels, table
    # measure only the new parts; the other rows stay as they are
    p_labels, p_table = measure_labels(parts_img, h_od, mpp, keep_area_um2)
    lut = np.zeros(max(int(labels.max()), int(table["label"].max(initial=0))) + 1, bool)
    lut[split_ids] = True
    return _replace_regions(labels, table, lut[labels], ~lut[table["label"]], p_labels, p_table)


_EIGHT = np.ones((3, 3), bool)


def _split_box(reg: np.ndarray, mpp: float, h_um: float) -> tuple[np.ndarray, np.ndarray, int] | None:
    """One region of :func:`split_by_shape` on its own box: ``(reg, part labels, n parts)``, None if not cut.

    The reference for :func:`_split_boxes_packed`, and its path for regions whose h-maxima
    markers are all below zero.
    """
    from skimage.morphology import h_maxima

    dist_um = (ndi.distance_transform_edt(reg) * mpp).astype(np.float32)
    # h-maxima costs a reconstruction; a region with one plateau of maxima needs none
    plateaus = (dist_um == ndi.maximum_filter(dist_um, footprint=_EIGHT)) & reg
    if ndi.label(plateaus, structure=_EIGHT)[1] < 2:
        return None
    peaks = h_maxima(dist_um, np.float32(h_um)).astype(bool) & reg
    markers, n = ndi.label(peaks, structure=_EIGHT)
    if n < 2:
        return None
    # cut along the watershed of the distance: through the waists
    return reg, _watershed(-dist_um, markers, reg), n


def _split_boxes_packed(labels: np.ndarray, boxes: list[tuple[int, int, int, int, int]], mpp: float, h_um: float,
                        open_sides: list[tuple[int, int, int, int]] | None = None,
                        ) -> list[tuple[np.ndarray, np.ndarray, int] | None]:
    """:func:`_split_box` of every box ``(label, r0, r1, c0, c1)``, most of the work done once.

    The boxes are packed on one canvas (shelves; neighbours share a margin row or column, so
    two regions are never 8-adjacent), and the distance, the plateau test and the h-maxima
    reconstruction run over the canvas instead of a few hundred small arrays. Each is the
    same as on the region's own box:

    - distance: every pixel outside the region within its box is background, and the box's
      margin ring is nearer to a region pixel than anything beyond it. A box without margin
      on a side (``open_sides``: top, bottom, left, right, 1 where the region touches the
      tile's edge) gets a ring of background there on the canvas, and its own distance;
    - plateaus: a region pixel's 3 x 3 neighbourhood lies inside its box (or on that ring,
      at distance 0, which never raises a maximum; SciPy's filter mirrors the box's edge);
    - reconstruction (the region's h-maxima): any path into a region from outside passes
      a background pixel (distance 0), so carries at most 0; on its own box the region's
      highest marker (``distance - h``) reaches a background pixel of the box at exactly 0
      too, as long as that marker is >= 0 and the box holds background. Other regions are
      done on their own box.

    The watershed stays per region: its queue breaks ties between equal heights by the
    order of insertion, which another region's pixels would change.
    """
    out: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * len(boxes)
    if not boxes:
        return out
    pads = np.zeros((len(boxes), 4), np.intp) if open_sides is None else np.asarray(open_sides, np.intp)
    bh = np.array([b[2] - b[1] for b in boxes])
    bw = np.array([b[4] - b[3] for b in boxes])
    ys, xs, shape = _shelf_pack(bh + pads[:, 0] + pads[:, 1], bw + pads[:, 2] + pads[:, 3])
    ys, xs = ys + pads[:, 0], xs + pads[:, 2]  # the box itself, inside its ring
    canvas = np.zeros(shape, bool)
    owner = np.zeros(shape, np.int32)  # 1 + box index on each region pixel
    regs = []
    for k, (lab_id, r0, r1, c0, c1) in enumerate(boxes):
        reg = labels[r0:r1, c0:c1] == lab_id
        regs.append(reg)
        win = (slice(ys[k], ys[k] + bh[k]), slice(xs[k], xs[k] + bw[k]))
        canvas[win] |= reg
        owner[win][reg] = k + 1
    n = len(boxes) + 1
    n_peaks = np.zeros(n, np.int64)
    dist = _edt_um(canvas, mpp)
    own_box = np.flatnonzero(pads.any(axis=1)).tolist()
    for k in own_box:
        dist[ys[k]:ys[k] + bh[k], xs[k]:xs[k] + bw[k]] = _edt_um(regs[k], mpp)
    grown = cv2.dilate(dist, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    plateaus = (dist == grown) & canvas
    _, n_plateaus = _components_per_owner(plateaus, owner, n)
    # skimage.morphology.h_maxima on float32, to the letter
    h = np.float32(h_um)
    resolution = 2 * np.finfo(dist.dtype).resolution * np.abs(dist)
    shifted = dist - h - resolution
    packed_ok = np.bincount(owner[canvas & (shifted >= 0)], minlength=n) > 0
    for k in own_box:
        packed_ok[k + 1] &= not regs[k].all()
    need = (n_plateaus >= 2) & packed_ok
    if need.any():
        rec = _reconstruct_by_dilation(shifted, dist)
        peaks = ((dist - rec) >= h) & canvas & need[owner]
        markers_all, n_peaks = _components_per_owner(peaks, owner, n)
    for k in range(len(boxes)):
        if n_plateaus[k + 1] < 2:
            continue
        if not packed_ok[k + 1]:
            out[k] = _split_box(regs[k], mpp, h_um)
            continue
        if n_peaks[k + 1] < 2:
            continue
        win = (slice(ys[k], ys[k] + bh[k]), slice(xs[k], xs[k] + bw[k]))
        out[k] = regs[k], _watershed(-dist[win], markers_all[win], regs[k]), int(n_peaks[k + 1])
    return out


def _shelf_pack(hh: np.ndarray, ww: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Top-left corners of boxes (heights ``hh``, widths ``ww``) on shelves, and the canvas shape.

    Tallest first; boxes next to each other, and shelves, overlap by one row or column (their
    margins, which are background).
    """
    order = np.argsort(-hh, kind="stable")
    width = max(int(ww.max()), int(math.sqrt(float((hh * ww).sum()))) + 1)
    ys = np.zeros(len(hh), np.intp)
    xs = np.zeros(len(hh), np.intp)
    y = x = 0
    shelf = int(hh[order[0]])
    for i in order.tolist():
        if x + ww[i] > width:
            y += shelf - 1
            x = 0
            shelf = int(hh[i])
        ys[i], xs[i] = y, x
        x += int(ww[i]) - 1
    return ys, xs, (y + shelf, width)


def _components_per_owner(mask: np.ndarray, owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of ``mask`` numbered per owner, and their number on each owner id (0..n-1).

    Components never span two owners. Each owner's components are numbered 1, 2, ... in the
    raster order of their first pixels, as ``ndi.label`` numbers them on the owner's own box
    (whose raster order is the canvas's): (H, W) int32, 0 off ``mask``.
    """
    comp, k = ndi.label(mask, structure=_EIGHT)
    comp_owner = np.zeros(k + 1, np.int64)
    comp_owner[comp[mask]] = owner[mask]
    # rank of each component among its owner's (ndi.label numbers in raster order)
    order = np.argsort(comp_owner[1:], kind="stable")
    counts = np.bincount(comp_owner[1:], minlength=n)
    starts = np.cumsum(counts) - counts
    rank = np.zeros(k + 1, np.int32)
    rank[order + 1] = (np.arange(k) - starts[comp_owner[1:][order]] + 1).astype(np.int32)
    return rank[comp], counts


def _edt_um(mask: np.ndarray, mpp: float) -> np.ndarray:
    """``(ndi.distance_transform_edt(mask) * mpp).astype(np.float32)`` to the bit (through OpenCV)."""
    return (distance_to_background(mask, np.float64) * mpp).astype(np.float32)


def _reconstruct_by_dilation(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey reconstruction by dilation of ``seed`` under ``mask`` (8-connected), float32.

    The same image as ``skimage.morphology.reconstruction(seed, mask)``: the reconstruction is
    unique and only takes maxima and minima of the inputs' values. Geodesic dilations until
    nothing changes; on distance maps with ``h`` below a pixel the values rise only along
    ridges within ``h`` of a maximum, a few steps.
    """
    rec = np.minimum(seed, mask)
    kernel = np.ones((3, 3), np.uint8)
    while True:
        nxt = cv2.dilate(rec, kernel, borderType=cv2.BORDER_REPLICATE)
        np.minimum(nxt, mask, out=nxt)
        if np.array_equal(nxt, rec):
            return rec
        rec = nxt


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


def split_by_area(
    h_od: np.ndarray,
    mpp: float,
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    *,
    nucleus_area_um2: float,
    max_solidity: float | None = None,
    max_area_um2: float | None = None,
    iterations: int = 20,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Cut regions as large as several nuclei into that many parts (clumps of overlapping nuclei).

    A region of area A holds ``k = round(A / nucleus_area_um2)`` nuclei; when k >= 2 its pixels
    are divided among k centres by k-means on their (row, col) (Lloyd's iterations started at
    k points spread along the region's major axis: deterministic), and each part becomes a
    nucleus.

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD, for the density columns of the new regions.
    mpp : float
        µm per pixel.
    labels, table
        Nuclei and their measurements (:data:`NUCLEUS_COLUMNS`).
    nucleus_area_um2 : float
        Area of one nucleus of a clump, µm².
    max_solidity : float, optional
        Only regions at most this solid (pixels / convex-hull pixels) are cut (None: any).
    max_area_um2 : float, optional
        Larger regions are never cut, µm² (a megakaryocyte nucleus is one cell).
    iterations : int
        Most Lloyd's iterations per region.

    Returns
    -------
    labels, table
        As :func:`detect_nuclei`; unchanged when no region is cut. Parts get new ids above the
        largest input id and their rows come last.

    Notes
    -----
    Why area: nuclei that overlap by more than about half their radius leave no waist in the
    union's outline (:func:`split_by_shape` needs one) and, drawn or stained to the same
    density, no dip in the haematoxylin either, so their count shows only in the area. The rule
    is only as good as ``nucleus_area_um2`` is for the tissue: a single nucleus larger than
    1.5 x that area is cut too (tumour nuclei of other organs are).
    """
    area = np.asarray(table["area_um2"], np.float64)
    k_all = np.floor(area / float(nucleus_area_um2) + 0.5).astype(np.int64)
    cand = k_all >= 2
    if max_solidity is not None:
        cand &= table["solidity"] <= float(max_solidity)
    if max_area_um2 is not None:
        cand &= area <= float(max_area_um2)
    if not cand.any():
        return labels, table
    objs = ndi.find_objects(labels)
    parts_img = np.zeros(labels.shape, np.int32)
    n_parts = 0
    split_ids = []
    for lab_id, k in zip(table["label"][cand].tolist(), k_all[cand].tolist(), strict=True):
        sl = objs[int(lab_id) - 1]
        if sl is None:
            continue
        rr, cc = np.nonzero(labels[sl] == lab_id)
        part = _kmeans_pixels(np.column_stack([rr, cc]).astype(np.float64), int(k), iterations)
        parts_img[sl][rr, cc] = part + 1 + n_parts
        n_parts += int(k)
        split_ids.append(int(lab_id))
    p_labels, p_table = measure_labels(parts_img, h_od, mpp, 0.0)
    return _replace_regions(labels, table, np.isin(labels, split_ids), ~np.isin(table["label"], split_ids),
                            p_labels, p_table)


def _kmeans_pixels(xy: np.ndarray, k: int, iterations: int) -> np.ndarray:
    """Part index (0..k-1) of each of the (N, 2) points: SciPy's k-means started along the major axis."""
    mean = xy.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(xy.T) if len(xy) > 2 else np.eye(2))
    axis = evecs[:, -1] * math.sqrt(max(float(evals[-1]), 0.0))
    centres = mean + np.linspace(-1.0, 1.0, k)[:, None] * axis[None, :]
    with warnings.catch_warnings():
        # a part left empty keeps its centre and its index: the ids are renumbered on measuring
        warnings.simplefilter("ignore", UserWarning)
        _, part = kmeans2(xy, centres, iter=iterations, minit="matrix", missing="warn")
    return part.astype(np.int64)


def _replace_regions(
    labels: np.ndarray, table: dict[str, np.ndarray], removed: np.ndarray, keep_rows: np.ndarray,
    new_labels: np.ndarray, new_table: dict[str, np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``labels``/``table`` with the ``removed`` pixels cleared and only ``keep_rows`` kept, plus new regions.

    New regions get ids above the largest input id (unique, not contiguous) and their rows come last.
    """
    out = np.where(removed, 0, labels).astype(np.int32, copy=False)  # np.where makes a new array
    offset = int(labels.max())
    # the new ids written where the new labels are (no boolean indexing: a tile's worth of pixels)
    new_labels = np.asarray(new_labels)
    np.add(new_labels, offset, out=out, where=new_labels > 0, casting="unsafe")
    result = {c: np.concatenate([table[c][keep_rows], new_table[c] + (offset if c == "label" else 0)])
              for c in NUCLEUS_COLUMNS}
    result["label"] = result["label"].astype(np.int32)
    return out, result


def measure_labels(labels: np.ndarray, h_od: np.ndarray, mpp: float, min_area_um2: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Table of :data:`NUCLEUS_COLUMNS` for ``labels``; regions below ``min_area_um2`` (µm²) are dropped.

    Returns the labels (dropped regions set to 0; ids otherwise kept) and the table; ``h_od``
    (OD) gives the density columns, ``mpp`` (µm per pixel) the areas.
    """
    px_um2 = float(mpp) ** 2
    m, idx, lab = _label_measurements(labels, h_od)
    area_um2 = m["area_px"] * px_um2
    keep = (area_um2 >= min_area_um2) & (m["area_px"] > 0)
    table = {
        "row": m["row"][keep],
        "col": m["col"][keep],
        "area_um2": area_um2[keep],
        "eccentricity": m["eccentricity"][keep],
        "solidity": m["solidity"][keep],
        "h_od_mean": m["mean"][keep],
        "h_od_cv": (m["std"] / np.maximum(m["mean"], 1e-6))[keep],
        "label": m["label"][keep],
    }
    if not keep.all():
        # the dropped regions' pixels cleared (as a lookup over the whole tile, int32)
        out = np.asarray(labels).astype(np.int32, order="C")
        out.ravel()[idx[~keep[lab - 1]]] = 0
        labels = out
    return labels, table


def detect_nuclei_from_centre_map(
    h_od: np.ndarray,
    mpp: float,
    cfg: Any,
    centre_map: np.ndarray,
    *,
    peak_map: np.ndarray | None = None,
    mask_map: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Detect nuclei at the peaks of a learned centre map (``detector: unet``) and measure them.

    Each peak of ``centre_map`` (>= ``unet_min_score``, >= ``unet_min_distance_um`` apart)
    is one nucleus; it is grown into a nuclear mask by the classical watershed (smoothed
    haematoxylin relief inside ``mask_map > mask_od``), so the measurements and classes are
    those of :func:`detect_nuclei`. Every peak is kept (a peak outside the haematoxylin mask
    is a one-pixel nucleus) and ``row``/``col`` are the peak, not the region centroid: the
    learned map decides where and how many nuclei there are.

    Parameters
    ----------
    h_od, mpp, cfg, peak_map, mask_map, allowed
        As :func:`detect_nuclei`.
    centre_map : (H, W) float ndarray
        Output of :class:`marrowseg.analyzers.nuclei_model.CentreNet`, in [0, 1].

    Returns
    -------
    labels, table
        As :func:`detect_nuclei`.
    """
    from marrowseg.analyzers.nuclei_model import centre_peaks

    h_od = _check_image(h_od)
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    cmap = _check_image(centre_map, "centre_map")
    peak = _smooth(h_od, cfg.peak_sigma_um, mpp) if peak_map is None else _check_image(peak_map, "peak_map")
    maskm = _smooth(h_od, cfg.mask_sigma_um, mpp) if mask_map is None else _check_image(mask_map, "mask_map")
    if cmap.shape != h_od.shape or peak.shape != h_od.shape or maskm.shape != h_od.shape:
        raise ValueError(f"centre/peak/mask maps {cmap.shape}/{peak.shape}/{maskm.shape} differ from h_od {h_od.shape}")
    centres = centre_peaks(cmap, mpp, min_score=float(cfg.unet_min_score),
                           min_distance_um=float(cfg.unet_min_distance_um), allowed=allowed)
    labels, table = nuclei_from_centres(h_od, mpp, centres, peak, maskm > np.float32(cfg.mask_od), min_area_um2=0.0)
    if len(table["label"]):
        seed = centres[table["label"] - 1].astype(np.float64)
        table["row"], table["col"] = seed[:, 0], seed[:, 1]
    return labels, table


def nuclei_from_centres(
    h_od: np.ndarray,
    mpp: float,
    centres: np.ndarray,
    relief: np.ndarray,
    mask: np.ndarray,
    *,
    min_area_um2: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Grow nuclei from given centres by watershed and measure them.

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD, for the density columns.
    mpp : float
        µm per pixel.
    centres : (N, 2) int ndarray
        (row, col) seeds, e.g. peaks of a smoothed map or of a learned centre map.
    relief : (H, W) float ndarray
        Higher inside nuclei; the watershed floods ``-relief``.
    mask : (H, W) bool ndarray
        Nuclear pixels; nuclei never grow outside it.
    min_area_um2 : float
        Smaller regions are dropped (their seeds too), µm².

    Returns
    -------
    labels, table
        As :func:`detect_nuclei`.
    """
    shape = h_od.shape
    if len(centres) == 0:
        return np.zeros(shape, np.int32), empty_table()
    centres = np.asarray(centres, dtype=np.intp).reshape(-1, 2)
    # a seed outside the mask still gets a minimal region: the mask must include it
    grow = np.asarray(mask, bool).copy()
    grow[centres[:, 0], centres[:, 1]] = True
    return measure_labels(_grow_seeds(centres, relief, grow), h_od, mpp, min_area_um2)


def label_measurements(labels: np.ndarray, intensity: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label shape and intensity measures, vectorised over labels with ``np.bincount``.

    Parameters
    ----------
    labels : (H, W) int ndarray
        0 background, 1..N objects (ids may be missing).
    intensity : (H, W) float ndarray

    Returns
    -------
    dict of str to (N,) ndarray
        ``label`` (int32, 1..N), ``area_px``, ``row``, ``col`` (centroid, px), ``eccentricity``
        (of the ellipse with the same second central moments, as scikit-image),
        ``solidity`` (pixels / pixel centres inside the convex hull of the object's pixel
        centres, counted exactly by Pick's theorem), ``mean`` and ``std`` (population) of
        ``intensity``; missing ids have area 0.
    """
    return _label_measurements(labels, intensity)[0]


def _label_measurements(
    labels: np.ndarray, intensity: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """:func:`label_measurements`, and the flat indices of the labelled pixels (raster order) and their labels.

    Everything after finding the labelled pixels works on them alone (a nucleus table's
    labels cover a tenth of a tile or less).
    """
    h, w = labels.shape
    flat = labels.ravel()
    idx = np.flatnonzero(flat != 0)  # a third of the time of np.flatnonzero(flat) on int32
    lab = flat[idx]
    n = int(lab.max()) if idx.size else 0
    out_label = np.arange(1, n + 1, dtype=np.int32)
    if n == 0:
        z = np.zeros(0)
        return ({"label": out_label, "area_px": z, "row": z, "col": z, "eccentricity": z, "solidity": z,
                 "mean": z, "std": z}, idx, lab)
    rows, cols = np.divmod(idx, w)
    r = rows.astype(np.float64)
    c = cols.astype(np.float64)
    v = intensity.ravel()[idx].astype(np.float64)
    nl = n + 1
    cnt = np.bincount(lab, minlength=nl)[1:].astype(np.float64)
    safe = np.maximum(cnt, 1.0)

    def mean_of(x: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=x, minlength=nl)[1:] / safe

    mr, mc = mean_of(r), mean_of(c)
    # central moments about each label's centroid (subtract first: no cancellation)
    dr, dc = r - mr[lab - 1], c - mc[lab - 1]
    vrr, vcc, vrc = mean_of(dr * dr), mean_of(dc * dc), mean_of(dr * dc)
    half_tr = 0.5 * (vrr + vcc)
    disc = np.sqrt(np.maximum(0.25 * (vrr - vcc) ** 2 + vrc**2, 0.0))
    l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 0.0)
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1.0 - l2 / np.where(l1 > 0, l1, 1.0), 0.0, 1.0)), 0.0)
    mean = mean_of(v)
    dv = v - mean[lab - 1]
    std = np.sqrt(mean_of(dv * dv))
    hull = _convex_pixel_counts(labels, n, (idx, lab, rows, cols))
    solidity = np.where(hull > 0, cnt / np.maximum(hull, 1.0), 0.0)
    return ({"label": out_label, "area_px": cnt, "row": mr, "col": mc, "eccentricity": ecc,
             "solidity": np.minimum(solidity, 1.0), "mean": mean, "std": std}, idx, lab)


def _convex_pixel_counts(labels: np.ndarray, n: int,
                         pixels: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Number of pixel centres inside (or on) each label's convex hull, (n,) float64.

    The hull is that of the object's boundary pixel centres (``cv2.convexHull``); its
    vertices are lattice points, so Pick's theorem counts the pixels exactly:
    ``area + boundary_points / 2 + 1``. ``pixels`` (flat index, label, row, col of every
    labelled pixel in raster order) saves finding them again.
    """
    h, w = labels.shape
    flat = labels.ravel()
    if pixels is None:
        idx = np.flatnonzero(flat != 0)
        lab = flat[idx]
        rows, cols = np.divmod(idx, w)
    else:
        idx, lab, rows, cols = pixels
    # a pixel is interior when its 4 neighbours carry the same label; only boundary
    # pixels (and those on the image border) can be hull vertices. The neighbours are looked
    # up for the labelled pixels only (an index off the image belongs to a border pixel).
    last = flat.size - 1
    edge = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
    for step in (1, w):
        edge |= flat[np.maximum(idx - step, 0)] != lab
        edge |= flat[np.minimum(idx + step, last)] != lab
    rr, cc = rows[edge], cols[edge]
    ll = lab[edge]
    # stable by label: a radix sort on 16-bit keys is the same permutation as on the labels
    order = np.argsort(ll.astype(np.uint16) if n < 2**16 else ll, kind="stable")
    ll = ll[order]
    pts = np.ascontiguousarray(np.column_stack([cc[order], rr[order]]).astype(np.int32))
    starts = np.searchsorted(ll, np.arange(1, n + 2))
    out = np.zeros(n, np.float64)
    size = np.diff(starts)
    # only the hull itself is per label; its lattice arithmetic is done for all hulls at once
    many = np.flatnonzero(size > 2)
    bounds = starts.tolist()  # Python ints: slicing with NumPy scalars costs more than the hull
    hulls = [cv2.convexHull(pts[bounds[i]:bounds[i + 1]]) for i in many.tolist()]
    few = np.flatnonzero((size > 0) & (size <= 2))
    if few.size:
        # one or two points: a segment, 1 + gcd(|dx|, |dy|) lattice points
        d = np.abs(pts[starts[few + 1] - 1].astype(np.int64) - pts[starts[few]])
        out[few] = 1.0 + np.gcd(d[:, 0], d[:, 1]).astype(np.float64)
    if hulls:
        nv = np.fromiter(map(len, hulls), np.intp, len(hulls))
        hv = np.concatenate(hulls).reshape(-1, 2).astype(np.int64)
        first = np.cumsum(nv) - nv
        nxt = np.arange(1, len(hv) + 1)
        nxt[first + nv - 1] = first  # each hull closes on its first vertex
        d = np.abs(hv[nxt] - hv)
        boundary = np.add.reduceat(np.gcd(d[:, 0], d[:, 1]), first).astype(np.float64)
        # shoelace in integers: exact, as cv2.contourArea's double sum on these small lattice hulls
        cross = hv[:, 0] * hv[nxt, 1] - hv[:, 1] * hv[nxt, 0]
        area = np.abs(np.add.reduceat(cross, first)).astype(np.float64) / 2.0
        out[many] = area + boundary / 2.0 + 1.0
    return out


def classify_nuclei(table: dict[str, np.ndarray], cfg: Any) -> np.ndarray:
    """Morphological class of each nucleus.

    Parameters
    ----------
    table : dict of str to (N,) ndarray
        Output of :func:`detect_nuclei` (needs ``area_um2``, ``eccentricity``,
        ``h_od_mean``, ``h_od_cv``).
    cfg : NucleusClassesConfig
        Size limits in µm², density in OD.

    Returns
    -------
    classes : (N,) object ndarray of str
        ``megakaryocyte`` (very large nucleus, and with ``megakaryocyte_max_od_cv`` an
        even one: not a clump of nuclei), ``late_erythroid`` (small, round, dense,
        homogeneous: polychromatic/orthochromatic normoblast) or ``other``.

    Notes
    -----
    Late normoblast nuclei are 4-6.5 µm across with pyknotic, evenly dark chromatin;
    megakaryocyte nuclei are lobulated and 20-50 µm across. Morphology alone cannot
    separate a late normoblast from a small lymphocyte; the E-cadherin stain can.
    """
    n = len(table["area_um2"])
    out = np.full(n, "other", dtype=object)
    if n == 0:
        return out
    area = np.asarray(table["area_um2"], np.float64)
    late = (
        (area >= cfg.late_erythroid_min_area_um2)
        & (area <= cfg.late_erythroid_max_area_um2)
        & (np.asarray(table["h_od_mean"]) >= cfg.late_erythroid_min_od)
        & (np.asarray(table["eccentricity"]) <= cfg.late_erythroid_max_eccentricity)
        & (np.asarray(table["h_od_cv"]) <= cfg.late_erythroid_max_od_cv)
    )
    out[late] = "late_erythroid"
    mega = area >= cfg.megakaryocyte_min_area_um2
    max_cv = getattr(cfg, "megakaryocyte_max_od_cv", None)
    if max_cv is not None:
        mega &= np.asarray(table["h_od_cv"]) <= max_cv
    out[mega] = "megakaryocyte"
    return out


def faint_nuclei(
    mask_od: np.ndarray,
    peak_od: np.ndarray,
    h_od: np.ndarray,
    mpp: float,
    taken: np.ndarray,
    *,
    background_um: float,
    contrast_od: float,
    gap_um: float,
    min_radius_um: float,
    min_distance_um: float,
    min_area_um2: float,
    max_area_um2: float,
    allowed: np.ndarray | None = None,
    max_background_od: float | None = None,
    max_eccentricity: float | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pale nuclei below the nuclear mask, found by their contrast with the local background.

    Parameters
    ----------
    mask_od, peak_od : (H, W) float ndarray
        Haematoxylin OD (scaled) smoothed as the nuclear detector's mask and peak maps
        (``mask_sigma_um``, ``peak_sigma_um``).
    h_od : (H, W) float ndarray
        Haematoxylin OD, for the density columns of the table.
    mpp : float
        µm per pixel.
    taken : (H, W) int or bool ndarray
        Nuclei (and cells) already found: their pixels and those within ``gap_um`` of them
        are left out.
    background_um : float
        Half-side of the square whose grey-level opening is the local background, µm: a
        nucleus into which the square does not fit stands out of it (white top-hat).
    contrast_od : float
        A faint nuclear pixel's ``mask_od`` exceeds its background by at least this, OD (so
        ``mask_od`` itself reaches it: the background is never negative).
    gap_um : float
        Margin round ``taken``, µm.
    min_radius_um : float
        A seed lies at least this deep inside the faint mask, µm: a crescent or a line (the
        blurred edge of a nucleus already found, a fat-cell membrane) holds none.
    min_distance_um : float
        Minimum distance between two seeds, µm. Seeds are the maxima of the top-hat of
        ``peak_od``: smoothed over 1.5 µm, the two to four lobes of a band or segmented
        nucleus make one maximum.
    min_area_um2, max_area_um2 : float
        Area of a kept region, µm².
    allowed : (H, W) bool ndarray, optional
        Where seeds may lie (haematopoietic tissue).
    max_background_od : float, optional
        A seed's local background (the grey-level opening of ``mask_od``) is at most this,
        OD: a pale nucleus lies in pale cytoplasm, while dark stroma and cytoplasm have a
        texture of their own that stands out of its background (None: no limit).
    max_eccentricity : float, optional
        More eccentric regions are dropped (None: no limit): in real H&E marrow the faint
        regions that are no annotated cell are elongated (cytoplasm between cells, sinusoid
        walls).

    Returns
    -------
    labels : (H, W) int32 ndarray
        The new nuclei (0 elsewhere), numbered from 1.
    table : dict of str to (M,) ndarray
        Their nucleus table (:data:`NUCLEUS_COLUMNS`).

    Notes
    -----
    The counterstain of an IHC section is light, and the nuclei of myeloid cells (open
    chromatin, lobed) and the caps of nuclei cut near a pole are pale: on the sectioned
    phantoms (tuning seeds 0-11, 2,048 px) the nuclear mask (0.4 OD) misses 51 % of the
    myeloid cells (91 % of bands, 66 % of segmented cells) and 20 % of late erythroid cells;
    at their centres the mask map reads a median 0.14 OD. An absolute threshold low enough
    for them runs into cytoplasm and stroma, a threshold on the excess over the local
    background does not.

    Shared by the E-cadherin analyzer (``ecad.faint_nuclei``, no limits) and the H&E analyzer
    (``he.faint_nuclei``). On real H&E marrow the pass without limits adds many pale bodies
    that annotators do not mark (mbm-dev: 900-1,160 cells to 3,805 annotated), hence the two
    optional limits, ``max_background_od`` and ``max_eccentricity`` (see ``configs/he.yaml``).
    """
    m = np.asarray(mask_od, np.float32)
    h, w = m.shape
    tophat = _white_tophat(m, background_um / mpp)
    faint = tophat >= np.float32(contrast_od)
    busy = (np.asarray(taken) != 0).astype(np.uint8)
    g = int(round(gap_um / mpp))
    if g > 0:
        busy = cv2.dilate(busy, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1)))
    faint &= busy == 0
    empty = np.zeros((h, w), np.int32), empty_table()
    if not faint.any():
        return empty
    depth = distance_to_background(faint)
    search = depth * np.float32(mpp) >= np.float32(min_radius_um)
    if allowed is not None:
        search &= np.asarray(allowed, bool)
    if max_background_od is not None:
        search &= (m - tophat) <= np.float32(max_background_od)
    if not search.any():
        return empty
    relief = _white_tophat(np.asarray(peak_od, np.float32), background_um / mpp)
    centres = local_peaks(relief, max(1, int(round(min_distance_um / mpp))), 0.0, search)
    labels, table = measure_labels(_grow_seeds(centres, relief, faint), np.asarray(h_od, np.float32), mpp,
                                       min_area_um2)
    big = table["area_um2"] > max_area_um2
    if max_eccentricity is not None:
        big |= table["eccentricity"] > max_eccentricity
    if big.any():
        labels[np.isin(labels, table["label"][big])] = 0
        table = {k: v[~big] for k, v in table.items()}
    return labels, table


def _grow_seeds(centres: np.ndarray, relief: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``watershed(-relief, markers, mask=mask)``, by connected component (labels 1..N, int32).

    With markers 1..N at ``centres`` (all inside ``mask``) the watershed floods each
    4-connected component of the mask from its own seeds only: a component with one seed is
    that seed's region whole, and only those with several go through the watershed, on their
    bounding box. Same labels as the full-tile watershed where no two pixels of a component
    tie in ``relief`` (between ties the flooding order may differ); over a tile of scattered
    regions that one cost about three times the rest of :func:`faint_nuclei`. The watershed of each
    box is :func:`_watershed`.
    """
    n, comp = cv2.connectedComponents(np.ascontiguousarray(mask).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    labels = np.zeros(mask.shape, np.int32)
    if len(centres) == 0:
        return labels
    centres = np.asarray(centres, np.intp).reshape(-1, 2)
    seed_comp = comp[centres[:, 0], centres[:, 1]]
    count = np.bincount(seed_comp, minlength=n)
    lut = np.zeros(n, np.int32)
    single = count[seed_comp] == 1
    lut[seed_comp[single]] = np.flatnonzero(single).astype(np.int32) + 1
    lut[0] = 0
    labels = lut[comp]
    multi = np.flatnonzero(count >= 2)
    multi = multi[multi > 0]
    if len(multi):
        # seeds grouped by component, in seed order within each
        by_comp = np.argsort(seed_comp, kind="stable")
        first = np.searchsorted(seed_comp[by_comp], multi)
        boxes = ndi.find_objects(comp)
        for c, f in zip(multi.tolist(), first.tolist(), strict=True):
            sl = boxes[c - 1]
            inside = comp[sl] == c
            markers = np.zeros(inside.shape, np.int32)
            k = by_comp[f:f + int(count[c])]
            markers[centres[k, 0] - sl[0].start, centres[k, 1] - sl[1].start] = k.astype(np.int32) + 1
            ws = _watershed(-relief[sl], markers, inside)
            labels[sl][inside] = ws[inside]
    return labels


def _white_tophat(img: np.ndarray, half_side_px: float) -> np.ndarray:
    """``img`` minus its grey-level opening by a square of half-side ``half_side_px`` (float32).

    A square rather than a disc: OpenCV opens by a rectangle in separable passes, about five
    times faster on a 2,048² tile (0.08 vs 0.37 s), and on the phantoms a square of half-side
    6 µm and a disc of radius 6 µm give the same figures (tuning seeds 0-11: matched truth
    cells 0.831 vs 0.829).
    """
    r = max(1, int(round(half_side_px)))
    return cv2.morphologyEx(np.asarray(img, np.float32), cv2.MORPH_TOPHAT, np.ones((2 * r + 1, 2 * r + 1), np.uint8),
                            borderType=cv2.BORDER_REPLICATE)
