"""The fibre skeleton: length (Vossepoel-Smeulders weights), spur pruning, branch points, merged
junctions and crossings.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from marrowseg.analyzers.morphology import binary_dilation

__all__ = ["skeleton_length_weights", "degree", "branch_points", "prune_spurs", "merge_points", "crossings", "label_sums"]


# Vossepoel A.M., Smeulders A.W.M. "Vector code probability and metrication error in the
# representation of straight lines of finite length." Comput Graph Image Process 20:347-364,
# 1982: length = 0.980 n_even + 1.406 n_odd - 0.091 n_corner (RMS error < 1 % for straight lines
# at any angle, unlike the plain 1 / sqrt(2) chain count, which over-estimates by up to 8 %).
VS_EVEN = 0.980


VS_ODD = 1.406


VS_CORNER = 0.091


_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _neighbours(skel: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """For each of the 8 offsets, whether the neighbour at that offset is a skeleton pixel."""
    p = np.pad(skel, 1)
    h, w = skel.shape
    return {(dr, dc): p[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] & skel for dr, dc in _OFFSETS}


def _links(skel: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Neighbour links of the skeleton graph with redundant diagonals removed.

    A diagonal link is dropped when the two pixels share a 4-neighbour in the skeleton
    (the staircase corner already connects them), so a thin 8-connected curve is a chain.
    """
    nb = _neighbours(skel)
    links = {}
    for (dr, dc), m in nb.items():
        if dr != 0 and dc != 0:
            m = m & ~nb[(dr, 0)] & ~nb[(0, dc)]
        links[(dr, dc)] = m
    return links


def skeleton_length_weights(skel: np.ndarray) -> np.ndarray:
    """Length carried by each skeleton pixel, in pixels.

    Each link of the chain is split half to each of its pixels; even (axial) links weigh
    0.980, odd (diagonal) links 1.406 and every corner (a degree-2 pixel whose two links
    are not collinear) subtracts 0.091 (Vossepoel & Smeulders 1982). Summing the weights
    over any subset of pixels (a tile core, a window) gives that subset's share of the
    length, so lengths add up exactly over a partition.

    Parameters
    ----------
    skel : (H, W) bool ndarray
        One-pixel-wide skeleton.

    Returns
    -------
    (H, W) float64 ndarray
        Length per pixel, pixels; 0 off the skeleton.

    References
    ----------
    Vossepoel A.M., Smeulders A.W.M., Comput Graph Image Process 20:347-364, 1982.
    """
    skel = np.asarray(skel, dtype=bool)
    links = _links(skel)
    w = np.zeros(skel.shape, np.float64)
    deg = np.zeros(skel.shape, np.int32)
    for (dr, dc), m in links.items():
        w += m * (0.5 * (VS_ODD if (dr and dc) else VS_EVEN))
        deg += m
    # a degree-2 pixel is straight only when its two links are opposite
    straight = np.zeros(skel.shape, bool)
    for dr, dc in _OFFSETS[:4]:
        straight |= links[(dr, dc)] & links[(-dr, -dc)]
    corner = (deg == 2) & ~straight
    w -= corner * VS_CORNER
    w[~skel] = 0.0
    return w


def degree(skel: np.ndarray) -> np.ndarray:
    """Number of chain links of each skeleton pixel (0 off the skeleton)."""
    skel = np.asarray(skel, dtype=bool)
    deg = np.zeros(skel.shape, np.int32)
    for m in _links(skel).values():
        deg += m
    return deg * skel


def branch_points(skel: np.ndarray) -> np.ndarray:
    """Skeleton pixels with three or more chain links, (H, W) bool."""
    return degree(skel) >= 3


def prune_spurs(skel: np.ndarray, max_len_px: float) -> np.ndarray:
    """Remove side branches shorter than ``max_len_px`` that end freely.

    A spur is a piece of skeleton between a branch point and a free end; skeletons of
    wide or irregular fibres grow such whiskers, and each would add a false junction.
    Pieces that touch no branch point (isolated fibres) are kept whatever their length.

    Parameters
    ----------
    skel : (H, W) bool ndarray
    max_len_px : float
        Spurs with fewer pixels than this are removed.

    Returns
    -------
    (H, W) bool ndarray
        Pruned skeleton, re-thinned.
    """
    skel = np.asarray(skel, dtype=bool).copy()
    if max_len_px <= 0 or not skel.any():
        return skel
    for _ in range(2):  # a second pass catches spurs exposed by the first
        deg = degree(skel)
        bp = deg >= 3
        if not bp.any():
            break
        bp_zone = binary_dilation(bp, np.ones((3, 3), bool))
        pieces, n = ndi.label(skel & ~bp_zone, structure=np.ones((3, 3), bool))
        if n == 0:
            break
        on = np.flatnonzero(pieces)
        own = pieces.ravel()[on]
        size = np.bincount(own, minlength=n + 1)[1:]
        has_end = np.bincount(own[deg.ravel()[on] == 1], minlength=n + 1)[1:] > 0
        # a piece touches a junction when it is adjacent to the junction zone
        near_bp = binary_dilation(bp_zone, np.ones((3, 3), bool))
        touches = np.bincount(own[near_bp.ravel()[on]], minlength=n + 1)[1:] > 0
        spur = has_end & touches & (size < max_len_px)
        if not spur.any():
            break
        lut = np.zeros(n + 1, bool)
        lut[1:] = spur
        skel &= ~lut[pieces]
        skel = skeletonize(skel)
    return skel


def merge_points(points: np.ndarray, radius_px: float) -> tuple[np.ndarray, int]:
    """Group marked pixels closer than ``2 * radius_px`` and return each group's centroid.

    Parameters
    ----------
    points : (H, W) bool ndarray
    radius_px : float
        Half the merge distance, pixels.

    Returns
    -------
    centroids : (N, 2) float64 ndarray
        (row, col) of each group's centroid; shape (0, 2) if none.
    n : int
    """
    points = np.asarray(points, dtype=bool)
    if not points.any():
        return np.zeros((0, 2), np.float64), 0
    lab, n = _groups_within(points, radius_px)
    cents = np.asarray(ndi.center_of_mass(points, lab, np.arange(1, n + 1)), np.float64).reshape(-1, 2)
    return cents, n


def _groups_within(points: np.ndarray, radius_px: float) -> tuple[np.ndarray, int]:
    """Label image of the marked pixels grown by a disk of ``radius_px``: nearby points share a label."""
    r = max(0.0, float(radius_px))
    ri = int(math.floor(r))
    yy, xx = np.mgrid[-ri : ri + 1, -ri : ri + 1]
    disk = (yy**2 + xx**2) <= r * r + 1e-9
    zone = binary_dilation(points, disk) if ri > 0 else points
    lab, n = ndi.label(zone, structure=np.ones((3, 3), bool))
    return lab, int(n)


def crossings(
    skel: np.ndarray,
    radius_px: float,
    pixel_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fibre crossings of a skeleton, from the excess degree of its branch points.

    Every branch point (a skeleton pixel with ``deg >= 3`` chain links) holds ``(deg - 2) / 2``
    crossings: two fibres crossing give one degree-4 pixel (1) or two degree-3 pixels some
    way apart (1/2 each), as happens when they cross at a shallow angle or overlap over a
    width; ``k`` crossings merged into one blob still add up to about ``k``; a fibre ending
    on another (a T) counts 1/2. Branch points closer than ``2 * radius_px`` form one
    junction, which only places the count (its centroid); the count itself does not depend
    on the grouping, so it is not sensitive to the merge distance.

    Parameters
    ----------
    skel : (H, W) bool ndarray
        One-pixel-wide skeleton.
    radius_px : float
        Half the distance within which branch points are one junction, pixels.
    pixel_weight : (H, W) float ndarray, optional
        Multiplies each branch point's ``(deg - 2) / 2`` (a per-pixel correction such as
        :func:`crossing_overlap_factor`); 1 when omitted.

    Returns
    -------
    centroids : (N, 2) float64 ndarray
        (row, col) centroid of each junction's branch points; shape (0, 2) if none.
    weight : (N,) float64 ndarray
        Crossings at each junction, the sum of ``(deg - 2) / 2`` (times ``pixel_weight``)
        over its branch points.

    Notes
    -----
    Over a whole graph, ``sum over nodes of (deg - 2) / 2 = E - V``; for ``n`` straight
    fibres with ``k`` crossings (``2 n`` free ends of degree 1, every other node of degree
    2) the sum over the branch nodes alone is ``k``, however the skeleton splits or merges
    the crossing nodes. Counting junctions instead (phantom seeds 5-11) gave +14..+37 % in
    loose networks, where a shallow crossing leaves two junctions; counting the branches
    leaving a merged junction lost branches that leave it side by side (-13..-24 %); the
    degree sum was within -1..-9 % for MF-1 and MF-2.
    """
    skel = np.asarray(skel, dtype=bool)
    deg = degree(skel)
    bp = deg >= 3
    if not bp.any():
        return np.zeros((0, 2), np.float64), np.zeros(0, np.float64)
    groups, n = _groups_within(bp, radius_px)
    # ndi.center_of_mass(bp, groups, 1..n) over the labelled pixels alone (the same sums)
    on = np.flatnonzero(groups)
    own = groups.ravel()[on]
    w = bp.ravel()[on].astype(np.float64)
    rr, cc = np.divmod(on, groups.shape[1])
    norm = np.bincount(own, weights=w, minlength=n + 1)[1 : n + 1]
    cents = np.column_stack([np.bincount(own, weights=w * rr, minlength=n + 1)[1 : n + 1] / norm,
                             np.bincount(own, weights=w * cc, minlength=n + 1)[1 : n + 1] / norm])
    excess = np.where(bp, (deg - 2) / 2.0, 0.0)
    if pixel_weight is not None:
        excess = excess * np.asarray(pixel_weight, np.float64)
    weight = label_sums(excess, groups, n)
    return cents, weight


def label_sums(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """``ndi.sum(values, labels, 1..n)`` as (n,) float64, reading only the labelled pixels.

    SciPy sums by ``np.bincount`` over the whole image; the labelled pixels alone, in the same
    raster order, give every label the same additions (bit-identical) at the cost of the
    few labelled pixels of a skeleton or mask, not of the tile.
    """
    on = np.flatnonzero(labels)
    w = np.asarray(values, np.float64).ravel()[on]
    return np.bincount(labels.ravel()[on], weights=w, minlength=n + 1)[1 : n + 1]
