"""The nucleus table: per-label measurements (area, shape, counterstain), region replacement and the
morphological classes read from the table.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

__all__ = ["NUCLEUS_COLUMNS", "NUCLEUS_CLASSES", "empty_table", "measure_labels", "label_measurements", "ellipse_width_um", "classify_nuclei",
           "nearest_pixels"]


#: columns of the nucleus table, in order; row/col in pixels of the input, float64
NUCLEUS_COLUMNS = ("row", "col", "area_um2", "eccentricity", "solidity", "h_od_mean", "h_od_cv", "label")


#: class names returned by :func:`classify_nuclei`
NUCLEUS_CLASSES = ("late_erythroid", "megakaryocyte", "other")


def empty_table() -> dict[str, np.ndarray]:
    """A nucleus table with no rows and every column of :data:`NUCLEUS_COLUMNS`."""
    out = {c: np.zeros(0, np.float64) for c in NUCLEUS_COLUMNS}
    out["label"] = np.zeros(0, np.int32)
    return out


def nearest_pixels(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays of the pixels nearest to points (``row``, ``col`` px, as in the table), clipped to ``shape``."""
    r = np.clip(np.round(np.asarray(rows, np.float64)).astype(np.intp), 0, shape[0] - 1)
    c = np.clip(np.round(np.asarray(cols, np.float64)).astype(np.intp), 0, shape[1] - 1)
    return r, c


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


def ellipse_width_um(table: dict[str, np.ndarray]) -> np.ndarray:
    """Minor axis of each nucleus, µm: that of the ellipse with its area and eccentricity.

    An ellipse of semi-axes a >= b has area pi a b and eccentricity sqrt(1 - b²/a²), so
    2 b = 2 sqrt(area sqrt(1 - e²) / pi).
    """
    e = np.clip(np.asarray(table["eccentricity"], np.float64), 0.0, 1.0)
    area = np.asarray(table["area_um2"], np.float64)
    return 2.0 * np.sqrt(area * np.sqrt(1.0 - e * e) / np.pi)


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
