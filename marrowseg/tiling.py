"""Tissue detection on a low-resolution view and the tile grid over it.

The grid is laid at the analyzer's resolution. Tiles overlap by ``overlap_px``; each
tile's *core* is the tile minus half the overlap on every interior side, so the cores of
all tiles partition the slide and per-tile quantities counted over cores add up to the
slide exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

__all__ = ["Tile", "axis_cores", "fill_enclosed_holes", "tile_grid", "tissue_mask", "tiles_over_mask"]


@dataclass(frozen=True)
class Tile:
    """One tile of the grid, in pixels of the analysis resolution.

    Attributes
    ----------
    index : int
        Row-major position among the tiles kept.
    grid_rc : (int, int)
        (row, col) of the tile in the full grid.
    origin_px : (int, int)
        (row, col) of the tile's top-left pixel in slide coordinates.
    size_px : int
        Side of the square tile, halo included.
    core : (slice, slice)
        Core region in tile coordinates.
    """

    index: int
    grid_rc: tuple[int, int]
    origin_px: tuple[int, int]
    size_px: int
    core: tuple[slice, slice]

    @property
    def core_slide(self) -> tuple[slice, slice]:
        """Core region in slide coordinates."""
        r0, c0 = self.origin_px
        return (
            slice(r0 + self.core[0].start, r0 + self.core[0].stop),
            slice(c0 + self.core[1].start, c0 + self.core[1].stop),
        )


def axis_cores(length_px: int, tile_px: int, overlap_px: int) -> list[tuple[int, int, int]]:
    """Tile starts and core extents along one axis.

    Tile ``k`` starts at ``k * stride`` with ``stride = tile_px - overlap_px``; its core is
    ``[k * stride + h, (k + 1) * stride + h)`` with ``h = overlap_px // 2``, clipped to
    ``[0, length_px)``. Consecutive cores meet exactly, so they partition the axis.

    Parameters
    ----------
    length_px : int
        Slide extent along the axis (> 0).
    tile_px, overlap_px : int
        Tile side and overlap, pixels; ``0 <= overlap_px < tile_px``.

    Returns
    -------
    list of (start, core_start, core_stop)
        Slide coordinates of each tile's first pixel and of its core.
    """
    if length_px <= 0:
        raise ValueError(f"length_px must be > 0, got {length_px}")
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"need 0 <= overlap_px < tile_px, got overlap {overlap_px}, tile {tile_px}")
    stride = tile_px - overlap_px
    half = overlap_px // 2
    n = max(1, math.ceil((length_px - half) / stride))
    out = []
    for k in range(n):
        start = k * stride
        lo = 0 if k == 0 else start + half
        hi = length_px if k == n - 1 else (k + 1) * stride + half
        out.append((start, lo, hi))
    return out


def tile_grid(
    shape_px: tuple[int, int], *, tile_px: int, overlap_px: int
) -> Iterator[Tile]:
    """Every tile of a slide of ``shape_px`` (rows, cols), row-major.

    Parameters
    ----------
    shape_px : (int, int)
        Slide size at the analysis resolution, (rows, cols).
    tile_px : int
        Tile side including the overlap, pixels.
    overlap_px : int
        Overlap between neighbouring tiles, pixels.

    Yields
    ------
    Tile
    """
    rows = axis_cores(shape_px[0], tile_px, overlap_px)
    cols = axis_cores(shape_px[1], tile_px, overlap_px)
    index = 0
    for i, (r0, rlo, rhi) in enumerate(rows):
        for j, (c0, clo, chi) in enumerate(cols):
            yield Tile(
                index=index,
                grid_rc=(i, j),
                origin_px=(r0, c0),
                size_px=tile_px,
                core=(slice(rlo - r0, rhi - r0), slice(clo - c0, chi - c0)),
            )
            index += 1


def tiles_over_mask(
    shape_px: tuple[int, int],
    mask: np.ndarray | None,
    *,
    tile_px: int,
    overlap_px: int,
) -> list[Tile]:
    """Tiles whose core touches the tissue mask, re-indexed 0..n-1 in grid order.

    Parameters
    ----------
    shape_px : (int, int)
        Slide size at the analysis resolution.
    mask : (m, n) bool ndarray or None
        Tissue mask covering the same slide at any coarser resolution (its pixel ``(i, j)``
        covers slide rows ``[i * rows / m, (i + 1) * rows / m)``). None keeps every tile.
    tile_px, overlap_px : int
        Grid geometry, pixels.
    """
    kept = []
    for tile in tile_grid(shape_px, tile_px=tile_px, overlap_px=overlap_px):
        if mask is not None:
            rs, cs = tile.core_slide
            fr = mask.shape[0] / shape_px[0]
            fc = mask.shape[1] / shape_px[1]
            m = mask[
                int(math.floor(rs.start * fr)) : max(int(math.ceil(rs.stop * fr)), int(math.floor(rs.start * fr)) + 1),
                int(math.floor(cs.start * fc)) : max(int(math.ceil(cs.stop * fc)), int(math.floor(cs.start * fc)) + 1),
            ]
            if not m.any():
                continue
        kept.append(
            Tile(index=len(kept), grid_rc=tile.grid_rc, origin_px=tile.origin_px,
                 size_px=tile.size_px, core=tile.core)
        )
    return kept


def tissue_mask(
    rgb: np.ndarray,
    mpp: float,
    *,
    min_od: float = 0.05,
    min_saturation: float = 0.04,
    max_od: float = 0.15,
    max_saturation: float = 0.15,
    min_object_um2: float = 40_000.0,
    max_hole_um2: float = 2_000_000.0,
    margin_um: float = 48.0,
    keep_border_objects: bool = False,
) -> np.ndarray:
    """Tissue mask of a low-resolution RGB view of a slide.

    Tissue absorbs light (optical density) or is coloured (saturation); glass is bright
    and grey. Each cue is thresholded by Otsu, clipped to ``[min, max]``, and a pixel is
    tissue when either exceeds its threshold. Specks smaller than ``min_object_um2`` are
    dropped and enclosed holes up to ``max_hole_um2`` (fat, sinusoids) are filled, then
    the mask is dilated by ``margin_um`` so tiles reach the tissue edge.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        Low-resolution view, white glass.
    mpp : float
        Its pixel size, µm/px.
    min_od, max_od, min_saturation, max_saturation : float
        Limits of the Otsu thresholds (mean RGB OD; HSV saturation 0..1).
    min_object_um2, max_hole_um2 : float
        Area limits, µm².
    margin_um : float
        Dilation, µm.
    keep_border_objects : bool
        Keep small objects that touch the image border (crops cut out of tissue).

    Returns
    -------
    mask : (H, W) bool ndarray
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    x = np.maximum(rgb.astype(np.float32), 1.0)
    od = (-np.log10(x / 255.0)).mean(axis=2)
    mx = x.max(axis=2)
    sat = (mx - x.min(axis=2)) / mx
    # Otsu separates glass from tissue on a slide; on a field that is all tissue it would
    # split the tissue itself, so each threshold is clipped to the range glass can have.
    od_t = float(np.clip(_otsu(od), min_od, max_od))
    sat_t = float(np.clip(_otsu(sat), min_saturation, max_saturation))
    # Glass is bright *and* grey; tissue absorbs or is coloured (silver-stained tissue is
    # grey but dark). Thin dark glass edges are removed below by the median and size filters.
    mask = (od > od_t) | (sat > sat_t)
    # A median removes the one-pixel lines of glass edges and scratches.
    mask = cv2.medianBlur(mask.astype(np.uint8), 3).astype(bool)
    px_area = mpp * mpp
    min_obj_px = int(min_object_um2 / px_area)
    if min_obj_px > 0:
        if keep_border_objects:
            border = np.zeros_like(mask)
            border[[0, -1], :] = True
            border[:, [0, -1]] = True
            lab, n = _label(mask)
            touching = np.unique(lab[border & mask])
            small = remove_small_objects(mask, max_size=min_obj_px)
            mask = small | np.isin(lab, touching[touching > 0])
        else:
            mask = remove_small_objects(mask, max_size=min_obj_px)
    max_hole_px = int(max_hole_um2 / px_area)
    if max_hole_px > 0 and mask.any():
        mask = fill_enclosed_holes(mask, max_hole_px)
    r = int(round(margin_um / mpp))
    if r > 0 and mask.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        mask = cv2.dilate(mask.astype(np.uint8), k).astype(bool)
    return mask


def _otsu(values: np.ndarray) -> float:
    v = values.ravel()
    if v.size == 0 or float(v.max()) - float(v.min()) < 1e-6:
        return 0.0
    return float(threshold_otsu(v))


def fill_enclosed_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill holes of at most ``max_px`` pixels that do not touch the image border (glass does).

    Holes are the 4-connected background components (the background of an 8-connected mask);
    ``max_px`` below 1 fills none.
    """
    lab, _ = _label(~mask, connectivity=4)
    sizes = np.bincount(lab.ravel())
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = sizes <= max_px
    fill[0] = False
    fill[edge] = False
    return mask | fill[lab]


def _label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=connectivity)
    return lab, n - 1
