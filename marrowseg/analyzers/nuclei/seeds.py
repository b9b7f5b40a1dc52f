"""Seeds and centres: local maxima, seeds for unseeded mask components, core centroids, and regions
grown from given centres (the learned centre map).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max

from marrowseg.analyzers.nuclei.maps import _check_image, _smooth
from marrowseg.analyzers.nuclei.table import empty_table, measure_labels
from marrowseg.analyzers.nuclei.watershed import _watershed

__all__ = ["local_peaks", "unseeded_components", "core_centroids", "nuclei_from_centres", "detect_nuclei_from_centre_map"]


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
    # the boxes come with the labelling (ndi.find_objects over the tile's thousands of
    # components cost as much as the watersheds it served)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask).view(np.uint8), connectivity=4,
                                                         ltype=cv2.CV_32S)
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
        for c, f in zip(multi.tolist(), first.tolist(), strict=True):
            x, y, bw, bh = (int(v) for v in stats[c, :4])
            sl = (slice(y, y + bh), slice(x, x + bw))
            inside = comp[sl] == c
            markers = np.zeros(inside.shape, np.int32)
            k = by_comp[f:f + int(count[c])]
            markers[centres[k, 0] - sl[0].start, centres[k, 1] - sl[1].start] = k.astype(np.int32) + 1
            ws = _watershed(-relief[sl], markers, inside)
            labels[sl][inside] = ws[inside]
    return labels


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
