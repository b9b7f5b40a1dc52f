"""Cutting regions that hold more than one nucleus: at the waists of non-convex shapes, or by area
(k-means of the pixels).
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.cluster.vq import kmeans2

from marrowseg.analyzers.distance import distance_to_background
from marrowseg.analyzers.nuclei.table import _replace_regions, measure_labels
from marrowseg.analyzers.nuclei.watershed import _watershed

__all__ = ["split_by_shape", "split_by_area"]


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
