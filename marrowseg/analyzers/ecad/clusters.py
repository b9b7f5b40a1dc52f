"""Clusters of E-cad+ cells: sheets (most neighbours positive) linked into clusters of a least extent."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

__all__ = ["count_clusters", "sheet_members"]


def count_clusters(
    rc_um: np.ndarray,
    *,
    link_um: float,
    min_extent_um: float,
) -> list[np.ndarray]:
    """Single-linkage clusters of points whose extent exceeds a size.

    Parameters
    ----------
    rc_um : (N, 2) float ndarray
        (row, col) positions, µm.
    link_um : float
        Points closer than this (<=) are linked.
    min_extent_um : float
        A cluster is kept when its largest pairwise distance exceeds this.

    Returns
    -------
    clusters : list of (k,) int64 ndarray
        Member indices of each kept cluster, sorted by the lowest (row, col) member.
    """
    pts = np.asarray(rc_um, np.float64).reshape(-1, 2)
    n = len(pts)
    if n < 2:
        return []
    pairs = cKDTree(pts).query_pairs(float(link_um), output_type="ndarray")
    if len(pairs) == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    out = []
    for c in np.unique(comp):
        members = np.flatnonzero(comp == c)
        if len(members) < 2:
            continue
        if float(pdist(pts[members]).max()) > min_extent_um:
            first = members[np.lexsort((pts[members, 1], pts[members, 0]))]
            out.append(first)
    out.sort(key=lambda m: (pts[m[0], 0], pts[m[0], 1]))
    return out


def sheet_members(rc_um: np.ndarray, positive: np.ndarray, *, radius_um: float, min_fraction: float) -> np.ndarray:
    """Positive cells that lie in a sheet: positive cells make up most of the cells around them.

    Parameters
    ----------
    rc_um : (N, 2) float ndarray
        (row, col) of every nucleated cell, µm.
    positive : (N,) bool ndarray
        E-cad+ calls.
    radius_um : float
        Neighbourhood radius, µm (the cell itself included).
    min_fraction : float
        Least share of positive cells among the cells of the neighbourhood.

    Returns
    -------
    (N,) bool ndarray
        Positive cells whose neighbourhood is at least ``min_fraction`` positive. An erythroid
        island of a reactive left shift mixes its positive cells with maturing and myeloid ones;
        a neoplastic sheet is positive throughout.
    """
    pts = np.asarray(rc_um, np.float64).reshape(-1, 2)
    positive = np.asarray(positive, bool)
    out = np.zeros(len(pts), bool)
    if not positive.any():
        return out
    tree = cKDTree(pts)
    near = tree.query_ball_point(pts[positive], float(radius_um), return_length=True)
    near_pos = cKDTree(pts[positive]).query_ball_point(pts[positive], float(radius_um), return_length=True)
    out[positive] = near_pos >= min_fraction * near
    return out
