"""Regions that belong together or do not count: the lobes of one segmented nucleus, the lobes of one
megakaryocyte, and strips too thin to be a nucleus.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage as ndi

from marrowseg.analyzers.distance import distance_to_background
from marrowseg.analyzers.nuclei.table import (
    _replace_regions,
    ellipse_width_um,
    empty_table,
    measure_labels,
    nearest_pixels,
)

__all__ = ["drop_thin", "group_lobes", "merge_megakaryocytes"]


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
    rows, cols = nearest_pixels(table["row"], table["col"], labels.shape)
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
    return distance_to_background(mask, reach=int(math.ceil(float(radius_px)))) >= radius_px
