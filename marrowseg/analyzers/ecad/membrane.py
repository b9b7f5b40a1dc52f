"""Per-cell DAB measurements around and inside nuclei: the membrane ring score, cells found by a closed
membrane alone, the pale rim of late normoblasts and the stained part of a nucleus.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from marrowseg.analyzers import nuclei as nuc
from marrowseg.analyzers.distance import nearest_label_band

__all__ = ["ring_scores", "membrane_enclosures", "inside_enclosure", "ring_enclosed_cells", "rim_density",
           "unstained_part"]


def ring_scores(
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    dab_od: np.ndarray,
    mpp: float,
    *,
    gap_um: float,
    width_um: float,
    sectors: int,
    min_own_sectors: int | None = None,
) -> np.ndarray:
    """Membrane DAB score of each nucleus, from a ring just outside it.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Nucleus labels (0 background), as from :func:`marrowseg.analyzers.nuclei.detect_nuclei`.
    table : dict of (N,) ndarray
        Nucleus table (``label``, ``row``, ``col``).
    dab_od : (H, W) float32 ndarray
        DAB optical density.
    mpp : float
        µm per pixel.
    gap_um, width_um : float
        The ring covers distances ``(gap_um, gap_um + width_um]`` from the nucleus; each
        ring pixel belongs to its nearest nucleus and never lies inside another one.
    sectors : int
        Angular sectors around the centroid.
    min_own_sectors : int, optional
        With it, ring pixels on the border between two cells' territories (a pixel with a
        4-neighbour that belongs to another nucleus or to its ring) are left out of the
        sector peaks when the cell keeps at least this many sectors without them; fewer
        (a cell boxed in by neighbours) and all its ring pixels count. None: all count.

    Returns
    -------
    score_od : (N,) float64 ndarray
        Median over the ring's sectors of each sector's highest DAB OD; 0 for a nucleus
        without ring pixels. A membrane all round the cell scores high; a positive
        neighbour's membrane, covering a sector or two, does not.

    Notes
    -----
    Where two cells touch, one membrane line lies on the border of their territories and
    is seen by both rings: a negative cell in a sheet of positive ones would borrow its
    neighbours' membranes on more than half of its sectors. Left out, the border DAB no
    longer counts, and a cell is positive by the membrane on its own free sides (the twelve
    phantom tuning seeds < 24 at ratios 0.4-0.8: E-cad+ calls on myeloid, lymphocyte and
    late erythroid cells 516 -> 406, on E-cad+ cells 1454 -> 1447).
    """
    n = len(table["label"])
    if n == 0:
        return np.zeros(0, np.float64)
    _, rr, cc, owner = nearest_label_band(labels, gap_um / mpp, (gap_um + width_um) / mpp, wanted=table["label"])
    lut = np.full(int(labels.max()) + 1 if labels.size else 1, -1, np.int64)
    lut[table["label"]] = np.arange(n)
    idx = lut[owner]
    ok = idx >= 0
    rr, cc, idx = rr[ok], cc[ok], idx[ok]
    ang = np.arctan2(rr - table["row"][idx], cc - table["col"][idx])
    sec = np.minimum(((ang + np.pi) / (2 * np.pi) * sectors).astype(np.int64), sectors - 1)
    vals = dab_od[rr, cc].astype(np.float64)
    key = idx * sectors + sec
    peak = _sector_peaks(key, vals, n, sectors)
    if min_own_sectors is not None:
        own = ~_territory_border(labels, lut, rr, cc, idx)
        own_peak = _sector_peaks(key[own], vals[own], n, sectors)
        use = (~np.isnan(own_peak)).sum(axis=1) >= min_own_sectors
        peak[use] = own_peak[use]
    have = ~np.isnan(peak).all(axis=1)
    out = np.zeros(n, np.float64)
    if have.any():
        out[have] = np.nanmedian(peak[have], axis=1)
    return out


def membrane_enclosures(dab_od: np.ndarray, mpp: float, *, dab_min_od: float,
                        sigma_um: float) -> tuple[np.ndarray, np.ndarray]:
    """The regions a DAB membrane encloses: 4-connected components below the membrane level.

    Parameters
    ----------
    dab_od : (H, W) float ndarray
        DAB optical density.
    mpp : float
        µm per pixel.
    dab_min_od : float
        DAB OD of a membrane pixel, after smoothing with ``sigma_um``.
    sigma_um : float
        Gaussian sigma of the smoothing, µm (0: none).

    Returns
    -------
    labels : (H, W) int32 ndarray
        Components of the pixels below ``dab_min_od`` numbered 1..K; 0 on the membrane.
    area_um2 : (K + 1,) float64 ndarray
        Area of each component, µm²; ``inf`` for a component that touches the image edge
        (open: it is not known to be closed) and for index 0 (the membrane).
    """
    ds = cv2.GaussianBlur(np.asarray(dab_od, np.float32), (0, 0), sigma_um / mpp) if sigma_um > 0 else dab_od
    lab, n = ndi.label(ds < np.float32(dab_min_od))
    area = np.bincount(lab.ravel(), minlength=n + 1) * (mpp * mpp)
    area[0] = np.inf
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        area[edge] = np.inf
    return lab.astype(np.int32, copy=False), area


def inside_enclosure(enclosures: tuple[np.ndarray, np.ndarray], rows: np.ndarray, cols: np.ndarray,
                     max_area_um2: float) -> np.ndarray:
    """Whether each point lies in a closed enclosure of at most ``max_area_um2`` (:func:`membrane_enclosures`).

    Parameters
    ----------
    enclosures : (labels, area_um2)
        As returned by :func:`membrane_enclosures`.
    rows, cols : (N,) float ndarray
        Points, px (rounded to the nearest pixel, clipped to the image).
    max_area_um2 : float
        Larger enclosures (a ring of positive cells round a group of others) do not count, µm².

    Returns
    -------
    (N,) bool ndarray
    """
    lab, area = enclosures
    return area[lab[nuc.nearest_pixels(rows, cols, lab.shape)]] <= max_area_um2


def ring_enclosed_cells(
    dab_od: np.ndarray,
    h_od: np.ndarray,
    mpp: float,
    taken_rc: np.ndarray,
    *,
    dab_min_od: float,
    sigma_um: float,
    min_area_um2: float,
    max_area_um2: float,
    min_h_od: float,
    allowed: np.ndarray | None = None,
    enclosures: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Cells enclosed by a closed DAB membrane that hold no detected nucleus.

    Parameters
    ----------
    dab_od, h_od : (H, W) float ndarray
        DAB and (scaled) haematoxylin OD.
    mpp : float
        µm per pixel.
    taken_rc : (N, 2) float ndarray
        (row, col) of the nuclei already detected, px: an enclosure holding one of them is
        that cell.
    dab_min_od : float
        DAB OD of a membrane pixel (after smoothing with ``sigma_um``).
    sigma_um : float
        Gaussian sigma of the DAB smoothing, µm (0: none).
    min_area_um2, max_area_um2 : float
        Area of an enclosure that is a cell, µm².
    min_h_od : float
        Mean haematoxylin OD inside the enclosure: a nucleus is in the section.
    allowed : (H, W) bool ndarray, optional
        Where cell centres may lie.
    enclosures : (labels, area_um2), optional
        :func:`membrane_enclosures` of ``dab_od`` with ``dab_min_od`` and ``sigma_um``, when
        already computed.

    Returns
    -------
    labels : (H, W) int32 ndarray
        The new cells' enclosures (0 elsewhere), numbered 1..M.
    table : dict of str to (M,) ndarray
        Nucleus-table columns (:data:`marrowseg.analyzers.nuclei.NUCLEUS_COLUMNS`) of the
        enclosures (area, shape and counterstain of the enclosed region).

    Notes
    -----
    The membrane stain marks the cell whatever the depth at which the section cuts it,
    while the nucleus of a cell cut near its pole is a small, faint cap that the nuclear
    detector misses (E-cad+ cells without a detection of their own: 32 % on tuning seeds
    12-23, 2,048 px). The enclosure is the background component of the membrane mask
    (4-connected) that does not touch the image edge.
    """
    h, w = dab_od.shape
    lab, area = enclosures if enclosures is not None else membrane_enclosures(
        dab_od, mpp, dab_min_od=dab_min_od, sigma_um=sigma_um)
    n = len(area) - 1
    if n == 0:
        return np.zeros((h, w), np.int32), nuc.empty_table()
    cnt = np.bincount(lab.ravel(), minlength=n + 1)
    hmean = np.bincount(lab.ravel(), weights=np.asarray(h_od, np.float64).ravel(), minlength=n + 1) / np.maximum(cnt, 1)
    ok = (area >= min_area_um2) & (area <= max_area_um2) & (hmean >= min_h_od)  # inf: open or the membrane
    rc = np.asarray(taken_rc, np.float64).reshape(-1, 2)
    if len(rc):
        ok[lab[nuc.nearest_pixels(rc[:, 0], rc[:, 1], lab.shape)]] = False
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        return np.zeros((h, w), np.int32), nuc.empty_table()
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    labels = lut[lab]
    _, table = nuc.measure_labels(labels, np.asarray(h_od, np.float32), mpp, 0.0)
    if allowed is not None:
        sel = np.asarray(allowed, bool)[nuc.nearest_pixels(table["row"], table["col"], (h, w))]
        table = {k: v[sel] for k, v in table.items()}
    return labels, table


def rim_density(
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    od: np.ndarray,
    mpp: float,
    *,
    inner_um: float,
    outer_um: float,
    quantile: float,
) -> np.ndarray:
    """Low quantile of a density just outside each nucleus, over its own territory.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Nucleus labels (0 background).
    table : dict of (N,) ndarray
        Nucleus table (``label``).
    od : (H, W) float ndarray
        Density to read (OD), e.g. haematoxylin + DAB.
    mpp : float
        µm per pixel.
    inner_um, outer_um : float
        The band covers background pixels at distances ``(inner_um, outer_um]`` from the
        nucleus (µm) whose nearest nucleus pixel belongs to it.
    quantile : float
        Quantile of ``od`` over the band, 0-1.

    Returns
    -------
    rim_od : (N,) float64 ndarray
        NaN for a nucleus without band pixels (boxed in by its neighbours).
    """
    return _rim_stats(labels, table, od, mpp, inner_um=inner_um, outer_um=outer_um, quantile=quantile)[0]


def _rim_stats(labels: np.ndarray, table: dict[str, np.ndarray], od: np.ndarray, mpp: float, *, inner_um: float,
               outer_um: float, quantile: float, pale_od: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rim_density` and the share of the band's pixels below ``pale_od`` (OD), from one band.

    Returns ``(rim_od, pale_share)``, (N,) float64 each; NaN for a nucleus without band
    pixels, and ``pale_share`` all NaN when ``pale_od`` is None.
    """
    n = len(table["label"])
    out = np.full(n, np.nan)
    pale = np.full(n, np.nan)
    if n == 0:
        return out, pale
    _, rr, cc, owner = nearest_label_band(labels, inner_um / mpp, outer_um / mpp, wanted=table["label"])
    lut = np.full(max(int(labels.max()), int(np.max(table["label"]))) + 1, -1, np.int64)
    lut[table["label"]] = np.arange(n)
    idx = lut[owner]
    ok = idx >= 0
    idx, vals = idx[ok], np.asarray(od, np.float64)[rr[ok], cc[ok]]
    if len(idx) == 0:
        return out, pale
    order = np.lexsort((vals, idx))
    idx, vals = idx[order], vals[order]
    cnt = np.bincount(idx, minlength=n)
    start = np.searchsorted(idx, np.arange(n))
    have = cnt > 0
    out[have] = vals[start[have] + np.minimum((cnt[have] * quantile).astype(np.int64), cnt[have] - 1)]
    if pale_od is not None:
        pale[have] = np.bincount(idx, weights=(vals < pale_od).astype(np.float64), minlength=n)[have] / cnt[have]
    return out, pale


def _sector_peaks(key: np.ndarray, vals: np.ndarray, n: int, sectors: int) -> np.ndarray:
    """(n, sectors) maximum of ``vals`` per ``key = cell * sectors + sector``; NaN where empty."""
    peak = np.full(n * sectors, -np.inf)
    np.maximum.at(peak, key, vals)  # per (cell, sector) maximum without a Python loop
    peak[np.bincount(key, minlength=n * sectors) == 0] = np.nan
    return peak.reshape(n, sectors)


def _territory_border(labels: np.ndarray, lut: np.ndarray, rr: np.ndarray, cc: np.ndarray,
                      idx: np.ndarray) -> np.ndarray:
    """Which ring pixels have a 4-neighbour owned by another cell (owner: the nucleus, or the ring it is in).

    Parameters
    ----------
    labels : (H, W) ndarray
        Nucleus labels (0 background).
    lut : ndarray
        Label -> table row (-1: not in the table).
    rr, cc, idx : (M,) ndarray
        Ring pixels and the row of the cell that owns each.

    Returns
    -------
    border : (M,) bool ndarray
        Looked up at the ring pixels' neighbours only, not over the tile.
    """
    h, w = labels.shape
    lut1 = (np.asarray(lut, np.int64) + 1).astype(np.int32)  # 0: nobody's (background, or a label not in the table)
    own = (np.asarray(idx) + 1).astype(np.int32)
    # ring pixels are background (label 0, owner 0 through lut1) and no nucleus is a ring pixel,
    # so a pixel's owner is the sum of the two lookups: no tile-sized owner map to fill first
    ring = np.zeros(h * w, np.int32)
    ring[rr * w + cc] = own
    lab = labels.ravel()
    border = np.zeros(len(rr), bool)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        # off the tile a neighbour is clipped onto the pixel itself, which is its own
        q = np.clip(rr + dr, 0, h - 1) * w + np.clip(cc + dc, 0, w - 1)
        nb = ring[q] + lut1[lab[q]]
        border |= (nb != own) & (nb > 0)
    return border


def unstained_part(regions: np.ndarray, dab_od: np.ndarray, min_od: float, mpp: float,
                   sigma_um: float = 0.5) -> np.ndarray:
    """Pixels of ``regions`` outside their DAB-stained part.

    A nuclear stain (Ki67) colours the positive nucleus only; where the detector merged it with
    the pale nuclei it touches, those are the region's unstained pixels.

    Parameters
    ----------
    regions : (H, W) bool ndarray
        Nuclear regions found positive.
    dab_od : (H, W) float ndarray
        DAB optical density.
    min_od : float
        Stained: DAB, smoothed by a Gaussian of ``sigma_um``, at or above this OD.
    mpp : float
        µm per pixel.
    sigma_um : float
        Gaussian sigma of the smoothing, µm (speckled chromatin staining stays one part).

    Returns
    -------
    (H, W) bool ndarray
        Region pixels neither stained nor enclosed by stained pixels.
    """
    regions = np.asarray(regions, bool)
    smooth = cv2.GaussianBlur(np.asarray(dab_od, np.float32), (0, 0), sigma_um / float(mpp))
    stained = ndi.binary_fill_holes(regions & (smooth >= min_od))
    return regions & ~stained


def _region_means(values: np.ndarray, labels: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each label of ``label_ids`` (0 for an empty label)."""
    if len(label_ids) == 0:
        return np.zeros(0, np.float64)
    m = int(labels.max()) + 1
    at = np.flatnonzero(labels)  # the same sums in the same order, without the background's pixels
    lab = labels.ravel()[at]
    s = np.bincount(lab, weights=values.ravel()[at].astype(np.float64), minlength=m)
    c = np.bincount(lab, minlength=m)
    return s[label_ids] / np.maximum(c[label_ids], 1)
