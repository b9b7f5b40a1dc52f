"""Reticulin (Gomori silver) analyzer: fibre length density, intersections, thick fibres, MF grade.

Dense step (torch, per batch): optical density, a multi-scale Hessian-oriented ridge contrast
of the min-channel OD (:func:`marrowseg.analyzers.fibres.ridge_contrast_torch`), and the
smoothed colour features of the tissue classes. Per tile (CPU): silver-stain tissue classes,
hysteresis, skeleton, spur pruning, junctions, widths; every quantity is counted over the
tile core only and per slide-aligned window. ``finalize`` turns the sums into readouts and
grades each window, then applies the heterogeneity rule.

Grading follows WHO 2016 / EUMNET (Thiele et al., Haematologica 2005;90:1128-1132): fibrosis
is judged in haematopoietic areas only; the measurement -> grade mapping is configuration
(``configs/reticulin.yaml``), not code.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
from skimage.morphology import skeletonize

from marrowseg.analyzers import fibres
from marrowseg.analyzers.base import Analyzer, LabelClass, TileContext, TileResult
from marrowseg.analyzers.distance import distance_to_background
from marrowseg.analyzers.tissue import opaque_colour
from marrowseg.stains import od_from_rgb, od_from_rgb_torch
from marrowseg.tiling import fill_enclosed_holes

__all__ = [
    "ReticulinAnalyzer",
    "grade_from_measurements",
    "grade_index_array",
    "absorb_small_foci",
    "apply_grade_rule",
    "borderline_grade",
    "window_readouts",
    "local_grades",
    "local_grades_from_config",
]

log = logging.getLogger(__name__)

EXCLUDED, HAEM, FAT, BONE = 0, 1, 2, 3
GRADE_NAMES = ("MF-0", "MF-1", "MF-2", "MF-3")
#: display colours of MF-0..MF-3 (local-grade map, report heatmap)
GRADE_RGB: tuple[tuple[int, int, int], ...] = ((60, 170, 90), (245, 205, 60), (240, 130, 40), (200, 30, 40))
MEASURES = ("fibre_length_um_per_1e4um2", "intersections_per_mm2", "thick_fibre_frac")


class _ReticulinModule(torch.nn.Module):
    """(B, 3, H, W) RGB 0..255 -> ridge contrast (OD), winning scale, tissue features."""

    def __init__(
        self,
        mpp: float,
        scales_um: tuple[float, ...],
        flank_factor: float,
        smooth_um: float,
        background_radius_um: float,
        blob_radius_um: float,
        chroma_penalty: float,
        half_max_radius_um: float,
        half_max_floor_od: float,
    ):
        super().__init__()
        self.half_max_floor_od = float(half_max_floor_od)
        self.chroma_penalty = float(chroma_penalty)
        self.half_max_radius_px = float(half_max_radius_um) / float(mpp)
        self.mpp = float(mpp)
        self.background_radius_px = float(background_radius_um) / float(mpp)
        self.blob_radius_px = float(blob_radius_um) / float(mpp)
        self.scales_um = tuple(float(s) for s in scales_um)
        self.flank_factor = float(flank_factor)
        self.smooth_px = float(smooth_um) / float(mpp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()  # the filter differences small OD contrasts: keep float32 under autocast
        od = od_from_rgb_torch(x)
        # silver absorbs in every channel; orange bone (red ~ glass) and the pink/purple
        # counterstain each leave one channel bright, so the minimum over channels isolates it
        lo = od.amin(dim=1, keepdim=True)
        hi = od.amax(dim=1, keepdim=True)
        # silver is a neutral absorber: OD equal in R, G, B. What a coloured stain adds to the
        # weakest channel is paid back in proportion to its colour spread, so magenta nuclei
        # and brown-orange collagen drop out while grey/black fibres keep their OD
        dark = (lo - self.chroma_penalty * (hi - lo)).clamp(min=0)
        ridge, scale_idx = fibres.ridge_contrast_torch(
            dark, self.mpp, scales_um=self.scales_um, flank_factor=self.flank_factor
        )
        # local background under fibres (grey opening removes anything narrower than the
        # structuring element); the top-hat is the fibre contrast used for half-max widths
        dark_s = fibres.gaussian_blur_torch(dark, 0.5)
        tophat = dark_s - fibres.grey_opening_torch(dark_s, self.background_radius_px)
        # a fibre's body is where its contrast is at least half the nearby peak (FWHM), so
        # the mask width follows the fibre, not its contrast over the hysteresis threshold;
        # but a fainter bundle beside a darker fibre on it keeps its own body
        half_max = fibres.half_max_body_torch(tophat, self.half_max_radius_px, self.half_max_floor_od)
        # what survives an opening at nucleus size: dark objects too wide to be reticulin
        wide_dark = fibres.grey_opening_torch(dark_s, self.blob_radius_px)
        mean_od = fibres.gaussian_blur_torch(od.mean(dim=1, keepdim=True), self.smooth_px)
        # golden-orange (bone, collagen) absorbs blue, not red
        orange = fibres.gaussian_blur_torch(od[:, 2:3] - od[:, 0:1], self.smooth_px)
        return {
            "ridge_od": ridge[:, 0],
            "scale_idx": scale_idx[:, 0],
            "mean_od": mean_od[:, 0],
            "orange_od": orange[:, 0],
            "tophat_od": tophat[:, 0],
            "half_max": half_max[:, 0],
            "wide_dark_od": wide_dark[:, 0],
        }


def _disk(radius_px: float) -> np.ndarray:
    r = int(math.floor(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= radius_px * radius_px + 1e-9


def _step_index(value: np.ndarray, thresholds: tuple[float, float, float]) -> np.ndarray:
    """Piecewise-linear 0..3 index of a measurement (any shape) against its MF-1..MF-3 bounds."""
    value = np.asarray(value, np.float64)
    idx = np.zeros(value.shape, np.float64)
    prev = 0.0
    prev_full = np.ones(value.shape, bool)
    for thr in thresholds:
        if thr <= prev:
            step = (value >= thr).astype(np.float64)
        else:
            step = np.clip((value - prev) / (thr - prev), 0.0, 1.0)
        # a grade's band only counts once every lower band is full
        step = np.where(prev_full, step, 0.0)
        idx += step
        prev_full = prev_full & (step >= 1.0)
        prev = thr
    return idx


def grade_index_array(measures: dict[str, np.ndarray], thresholds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise :func:`grade_from_measurements` over arrays of measurements.

    Parameters
    ----------
    measures : dict of str to ndarray
        ``fibre_length_um_per_1e4um2``, ``intersections_per_mm2``, ``thick_fibre_frac``, all
        of one shape.
    thresholds : GradeThresholds
        Lower bounds of MF-1..MF-3 per measurement.

    Returns
    -------
    grade : int8 ndarray
        0..3.
    index : float64 ndarray
        0..3.
    """
    idx = np.minimum.reduce([_step_index(measures[k], tuple(getattr(thresholds, k))) for k in MEASURES])
    idx = np.clip(idx, 0.0, 3.0)
    grade = np.minimum(3, np.floor(idx + 1e-9)).astype(np.int8)
    return grade, idx


def grade_from_measurements(measures: dict[str, float], thresholds: Any) -> tuple[int, float]:
    """MF grade and continuous fibrosis index from the three fibre measurements.

    Each measurement ``m`` gives a piecewise-linear index: 0 at 0, 1 at its MF-1 bound,
    2 at MF-2, 3 at MF-3 (a bound equal to the previous one is a step). The fibrosis index
    is the minimum over measurements (a grade needs all its criteria), so it is continuous
    in the length density, monotone in every measurement, and ``floor`` gives the grade.

    Parameters
    ----------
    measures : dict
        ``fibre_length_um_per_1e4um2``, ``intersections_per_mm2``, ``thick_fibre_frac``.
    thresholds : GradeThresholds
        Lower bounds of MF-1..MF-3 per measurement.

    Returns
    -------
    grade : int
        0..3.
    index : float
        0..3.
    """
    grade, idx = grade_index_array({k: np.float64(measures[k]) for k in MEASURES}, thresholds)
    return int(grade), float(idx)


def window_readouts(win: dict[str, Any], mpp: float) -> dict[str, Any]:
    """Length density, intersection density and thick fraction of one window's sums.

    Parameters
    ----------
    win : dict
        ``haem_px`` (pixels at ``mpp``), ``fibre_length_um``, ``thick_fibre_length_um``,
        ``n_junctions``: scalars, or arrays of one shape (one element per window).
    mpp : float
        Pixel size of ``haem_px``, µm per pixel.

    Returns
    -------
    dict
        ``fibre_length_um_per_1e4um2`` (µm per 1e4 µm²), ``intersections_per_mm2`` (per mm²),
        ``thick_fibre_frac`` (of length): 0 where there is no haematopoietic area / no fibre;
        floats for scalar input, float64 arrays otherwise.
    """
    haem_um2 = np.asarray(win.get("haem_px", 0), np.float64) * mpp * mpp
    length = np.asarray(win.get("fibre_length_um", 0.0), np.float64)
    junctions = np.asarray(win.get("n_junctions", 0), np.float64)
    thick = np.asarray(win.get("thick_fibre_length_um", 0.0), np.float64)
    has_haem = haem_um2 > 0
    has_len = length > 0
    safe_haem = np.where(has_haem, haem_um2, 1.0)
    safe_len = np.where(has_len, length, 1.0)
    out = {
        "fibre_length_um_per_1e4um2": np.where(has_haem, length / safe_haem * 1e4, 0.0),
        "intersections_per_mm2": np.where(has_haem, junctions / safe_haem * 1e6, 0.0),
        "thick_fibre_frac": np.where(has_len, thick / safe_len, 0.0),
    }
    if haem_um2.ndim == 0:
        return {k: float(v) for k, v in out.items()}
    return out


#: the additive per-cell sums the local grade is computed from
CELL_SUMS = ("haem_px", "fibre_length_um", "thick_fibre_length_um", "n_junctions")


def local_grades(
    cells: dict[tuple[int, int], dict[str, float]],
    mpp: float,
    thresholds: Any,
    *,
    cell_um: float,
    window_um: float,
    min_haem_frac: float,
    max_window_um: float | None = None,
    placement: str = "centred",
    border_ratio: float = 3.0,
    density_floor: float = 100.0,
    min_focus_um2: float = 0.0,
) -> dict[str, Any]:
    """Local MF grade of every grid cell, measured over a sliding window that contains it.

    The slide is cut into slide-aligned square cells of side ``cell_um`` (the per-tile sums
    of :class:`ReticulinAnalyzer` ``TileResult.windows``). A cell's local grade is the grade
    of the pooled sums over an ``n x n`` block of cells, ``n = 2 round((window_um / cell_um -
    1) / 2) + 1`` (so a window about ``window_um`` wide), and it stands for the cell's own
    haematopoietic area.

    With ``placement='centred'`` the block is centred on the cell, so the blur at the border
    between two regions is symmetric; but where the two sides are two grades apart (MF-0 next
    to MF-2, an MF-3 patch in MF-1) the mixed windows along the border read as the grade in
    between, a band that takes area from both sides. ``placement='homogeneous'`` is
    border-aware (Kuwahara-style edge-preserving choice): a cell whose candidate windows -- the
    ``n x n`` blocks that contain it and hold enough marrow -- differ in pooled length density
    by more than ``border_ratio`` (after adding ``density_floor``) lies at a region border, and
    is graded by the candidate whose cells are most alike (least area-weighted variance of
    ``log(cell length density + density_floor)``), which lies on the cell's own side. Other
    cells keep the centred window, so inside a region the map is the centred one. Everything
    is computed from the per-cell sums, so the map does not depend on tiling or order.

    Parameters
    ----------
    cells : dict of (int, int) to dict of str to float
        Sums per cell index (row, col) = ``floor(slide µm / cell_um)``: ``haem_px`` (pixels
        at ``mpp``), ``fibre_length_um``, ``thick_fibre_length_um``, ``n_junctions``.
    mpp : float
        Pixel size of ``haem_px``, µm per pixel.
    thresholds : GradeThresholds
        Lower bounds of MF-1..MF-3 per measurement.
    cell_um : float
        Side of a cell, µm.
    window_um : float
        Side of the grading window, µm (>= ``cell_um``; one cell when equal).
    min_haem_frac : float
        A grading window must hold at least this fraction of ``(n * cell_um)²`` of
        haematopoietic area; a cell (with some of its own) whose window holds less is graded
        over the smallest larger window, up to ``max_window_um``, that does, and is not graded
        when none does. Fatty marrow is then graded over more ground rather than left out
        (which would inflate the share of the denser, more cellular regions). With
        ``placement='homogeneous'`` a border cell may instead take an off-centre window of the
        same size that holds enough marrow.
    max_window_um : float, optional
        Largest grading window, µm (default ``window_um``: no growth).
    placement : {'centred', 'homogeneous'}
        Which window grades a cell (see above).
    border_ratio : float
        ``placement='homogeneous'`` only: ratio (> 1) of the highest to the lowest pooled
        ``length density + density_floor`` among a cell's candidate windows above which the
        cell is at a region border.
    density_floor : float
        ``placement='homogeneous'`` only: added to length densities (µm per 1e4 µm²) before
        ratios and logarithms, so that empty and sparse cells of MF-0 marrow do not read as
        far apart.
    min_focus_um2 : float
        Foci of one local grade with less haematopoietic area than this, µm², take the grade
        around them (:func:`absorb_small_foci`); 0 keeps every window's grade.

    Returns
    -------
    dict
        ``origin`` ((row, col) index of array element [0, 0]), ``grades`` ((R, C) int8,
        -1 = not graded; after ``min_focus_um2``), ``window_grades`` (the same before it), ``index`` ((R, C) float64 fibrosis index of the window, nan = not
        graded), ``haem_um2`` ((R, C) float64, the cell's own haematopoietic area),
        ``area_by_grade`` (dict grade -> µm² of graded cells' own area), ``window_cells``
        (``n``, the smallest window), ``window_cells_used`` ((R, C) int16, the window each
        cell was graded over, 0 = not graded), ``window_offset`` ((R, C, 2) int16, centre of
        that window less the cell, in cells; 0 for centred windows). Empty arrays (shape
        (0, 0)) when there are no cells.
    """
    if cell_um <= 0 or window_um <= 0:
        raise ValueError(f"cell_um and window_um must be > 0, got {cell_um}, {window_um}")
    if placement not in ("centred", "homogeneous"):
        raise ValueError(f"placement must be 'centred' or 'homogeneous', got {placement!r}")
    if placement == "homogeneous" and (border_ratio <= 1 or density_floor < 0):
        raise ValueError(f"need border_ratio > 1 and density_floor >= 0, got {border_ratio}, {density_floor}")
    half = max(0, int(round((window_um / cell_um - 1.0) / 2.0)))
    n = 2 * half + 1
    max_half = half
    if max_window_um is not None:
        max_half = max(half, int(round((max_window_um / cell_um - 1.0) / 2.0)))
    area_by_grade = {g: 0.0 for g in range(4)}
    if not cells:
        empty = np.zeros((0, 0))
        return {"origin": (0, 0), "grades": empty.astype(np.int8), "window_grades": empty.astype(np.int8),
                "index": empty, "haem_um2": empty,
                "area_by_grade": area_by_grade, "window_cells": n,
                "window_cells_used": empty.astype(np.int16), "window_offset": np.zeros((0, 0, 2), np.int16)}
    keys = np.array(sorted(cells), np.int64).reshape(-1, 2)
    r0, c0 = keys.min(axis=0)
    shape = tuple(int(v) for v in keys.max(axis=0) - (r0, c0) + 1)
    grids = {k: np.zeros(shape, np.float64) for k in CELL_SUMS}
    for (r, c), w in cells.items():
        for k in CELL_SUMS:
            grids[k][r - r0, c - c0] = float(w.get(k, 0.0))

    def box(a: np.ndarray, h: int) -> np.ndarray:
        # window sums, zero beyond the grid; shifted adds (not a summed-area table, whose
        # differences of large running sums leave rounding residue in empty windows)
        p = np.pad(a, h)
        out = np.zeros(a.shape, np.float64)
        for dr in range(2 * h + 1):
            for dc in range(2 * h + 1):
                out += p[dr : dr + shape[0], dc : dc + shape[1]]
        return out

    def shifted(a: np.ndarray, dr: int, dc: int, fill: float) -> np.ndarray:
        # out[r, c] = a[r + dr, c + dc]: the value of the window centred (dr, dc) cells away
        m = max(abs(dr), abs(dc))
        p = np.pad(a, m, constant_values=fill)
        return p[m + dr : m + dr + shape[0], m + dc : m + dc + shape[1]]

    px_um2 = mpp * mpp
    haem_um2 = grids["haem_px"] * px_um2
    need_um2 = min_haem_frac * (n * cell_um) ** 2
    grade = np.full(shape, -1, np.int8)
    idx = np.full(shape, np.nan)
    used = np.zeros(shape, np.int16)
    offset = np.zeros(shape + (2,), np.int16)
    todo = haem_um2 > 0
    if placement == "homogeneous":
        # per-cell log length density, weighted by the cell's marrow: the homogeneity criterion
        dens = np.where(haem_um2 > 0, grids["fibre_length_um"] / np.where(haem_um2 > 0, haem_um2, 1.0) * 1e4, 0.0)
        x = np.log(dens + density_floor)
        moments = {"w": haem_um2, "wx": haem_um2 * x, "wxx": haem_um2 * x * x}
    for h in range(half, max_half + 1):
        if not todo.any():
            break
        win = {k: box(v, h) for k, v in grids.items()}
        ok = win["haem_px"] * px_um2 >= need_um2
        readouts = window_readouts(win, mpp)
        g, i = grade_index_array(readouts, thresholds)
        if placement == "centred":
            sel = todo & ok
            grade[sel], idx[sel], used[sel] = g[sel], i[sel], 2 * h + 1
            todo &= ~sel
            continue
        mom = {k: box(v, h) for k, v in moments.items()}
        sw = np.where(mom["w"] > 0, mom["w"], 1.0)
        mean = mom["wx"] / sw
        var = np.where(ok, np.maximum(mom["wxx"] / sw - mean * mean, 0.0), np.inf)
        logd = np.log(readouts["fibre_length_um_per_1e4um2"] + density_floor)
        lo, hi = np.where(ok, logd, np.inf), np.where(ok, logd, -np.inf)
        shifts = [(dr, dc) for dr in range(-h, h + 1) for dc in range(-h, h + 1) if (dr, dc) != (0, 0)]
        lo_all, hi_all = lo.copy(), hi.copy()
        for dr, dc in shifts:
            lo_all = np.minimum(lo_all, shifted(lo, dr, dc, np.inf))
            hi_all = np.maximum(hi_all, shifted(hi, dr, dc, -np.inf))
        border = np.isfinite(lo_all) & (hi_all - lo_all > math.log(border_ratio))
        # the centred window first; an off-centre one only at a border and only when strictly
        # more homogeneous (ties keep the earlier, so the choice does not depend on float order)
        best = np.where(ok, var, np.inf)
        bg, bi = g.copy(), i.copy()
        boff = np.zeros(shape + (2,), np.int16)
        for dr, dc in shifts:
            v = shifted(var, dr, dc, np.inf)
            better = border & (v < best)
            if better.any():
                best = np.where(better, v, best)
                bg = np.where(better, shifted(g, dr, dc, 0), bg)
                bi = np.where(better, shifted(i, dr, dc, 0.0), bi)
                boff[better] = (dr, dc)
        sel = todo & np.isfinite(best)
        grade[sel], idx[sel], used[sel], offset[sel] = bg[sel], bi[sel], 2 * h + 1, boff[sel]
        todo &= ~sel
    window_grade = grade
    if min_focus_um2 > 0:
        grade = absorb_small_foci(grade, haem_um2, min_focus_um2)
    for gr in range(4):
        area_by_grade[gr] = float(haem_um2[grade == gr].sum())
    return {"origin": (int(r0), int(c0)), "grades": grade, "window_grades": window_grade, "index": idx,
            "haem_um2": haem_um2,
            "area_by_grade": area_by_grade, "window_cells": n, "window_cells_used": used,
            "window_offset": offset}


def local_grades_from_config(cells: dict[tuple[int, int], dict[str, float]], mpp: float, c: Any,
                             **overrides: Any) -> dict[str, Any]:
    """:func:`local_grades` with every grading setting taken from a ``ReticulinConfig``.

    Parameters
    ----------
    cells : dict of (int, int) to dict of str to float
        Per-cell sums, as for :func:`local_grades`.
    mpp : float
        Pixel size of ``haem_px``, µm per pixel.
    c : ReticulinConfig
        Grade thresholds, window sizes (µm), placement, border and focus settings.
    **overrides
        Keyword arguments of :func:`local_grades` that replace the config's (e.g.
        ``placement='centred'``).

    Returns
    -------
    dict
        As :func:`local_grades`.
    """
    kw = dict(cell_um=c.window_um, window_um=c.grade_window_um, min_haem_frac=c.window_min_haem_frac,
              max_window_um=c.grade_window_max_um, placement=c.grade_window_placement,
              border_ratio=c.grade_border_ratio, density_floor=c.grade_border_density_floor_um_per_1e4um2,
              min_focus_um2=c.grade_min_focus_um2)
    kw.update(overrides)
    return local_grades(cells, mpp, c.grade_thresholds, **kw)


def absorb_small_foci(grades: np.ndarray, haem_um2: np.ndarray, min_focus_um2: float) -> np.ndarray:
    """Give speckles of one local grade, smaller than ``min_focus_um2``, the grade around them.

    A focus is a 4-connected set of cells of one grade. A focus below ``min_focus_um2`` of
    haematopoietic area whose bordering graded cells are all of lower grades, or all of
    higher grades, is a speckle inside a region: it takes the grade holding most
    haematopoietic area among those cells (ties: the lower grade) and joins the foci of that
    grade it touches. A small focus bordered by both lower and higher grades lies between two
    regions (the band a window reads where MF-1 meets MF-3) and keeps its grade: giving it to
    either side would move the border. The smallest eligible focus goes first, and this
    repeats until none is left, so the result depends only on the map, not on any order.
    Why: a 150 µm window holds a few hundred µm of fibre in MF-1 marrow, so single windows
    scatter by a grade, and the EUMNET rule grades regions, not single fields.

    Parameters
    ----------
    grades : (R, C) int8 ndarray
        Local grades 0..3, -1 = not graded.
    haem_um2 : (R, C) float ndarray
        Each cell's own haematopoietic area, µm².
    min_focus_um2 : float
        Smallest focus kept whatever surrounds it, µm² of haematopoietic area.

    Returns
    -------
    (R, C) int8 ndarray
        The grades after absorption (a new array; ungraded cells stay -1).
    """
    out = np.array(grades, np.int8, copy=True)
    haem = np.asarray(haem_um2, np.float64)
    four = ndi.generate_binary_structure(2, 1)
    while True:
        best = None
        for g in range(4):
            lab, n = ndi.label(out == g, structure=four)
            if n == 0:
                continue
            area = fibres.label_sums(haem, lab, n)
            boxes = ndi.find_objects(lab)
            for i in np.flatnonzero(area < min_focus_um2):
                sl = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in boxes[i])
                focus = lab[sl] == i + 1
                sub = out[sl]
                rim = ndi.binary_dilation(focus, four) & ~focus & (sub >= 0)
                if not rim.any():
                    continue
                by_grade = np.bincount(sub[rim].astype(np.int64), weights=haem[sl][rim], minlength=4)
                if by_grade[:g].any() and by_grade[g + 1 :].any():
                    continue
                first = (sl[0].start + int(np.argmax(focus.any(axis=1))), sl[1].start)
                key = (float(area[i]), g, first)
                if best is None or key < best[0]:
                    best = (key, lab == i + 1, int(np.argmax(by_grade)))
        if best is None:
            return out
        out[best[1]] = best[2]


def apply_grade_rule(area_by_grade: dict[int, float], rule: str, frac: float) -> int:
    """Slide grade from the haematopoietic area at each local grade.

    Parameters
    ----------
    area_by_grade : dict of int to float
        Haematopoietic area (any unit) graded 0..3.
    rule : {'eumnet_30pct', 'max', 'majority'}
        ``eumnet_30pct``: highest grade present in at least ``frac`` of the area (EUMNET:
        heterogeneous marrow is graded by the highest grade in >= 30 % of it); ``max``: the
        highest grade anywhere; ``majority``: the grade with the largest area (ties: higher).
    frac : float
        Share of area for ``eumnet_30pct``.

    Returns
    -------
    int
        0..3; 0 when no area was graded.
    """
    total = float(sum(area_by_grade.values()))
    if total <= 0:
        return 0
    present = [g for g in range(4) if area_by_grade.get(g, 0.0) > 0]
    if rule == "max":
        return max(present)
    if rule == "majority":
        return max(range(4), key=lambda g: (area_by_grade.get(g, 0.0), g))
    if rule == "eumnet_30pct":
        for g in range(3, -1, -1):
            if area_by_grade.get(g, 0.0) >= frac * total - 1e-9 * total:
                return g
        # no single grade reaches the share: fall to the grade reached cumulatively from the top
        acc = 0.0
        for g in range(3, -1, -1):
            acc += area_by_grade.get(g, 0.0)
            if acc >= frac * total:
                return g
        return 0
    raise ValueError(f"unknown grade rule {rule!r}; expected eumnet_30pct, max or majority")


def borderline_grade(area_by_grade: dict[int, float], frac: float, margin: float) -> int | None:
    """The other grade of a heterogeneous marrow whose ``eumnet_30pct`` grade hangs on a share near ``frac``.

    Parameters
    ----------
    area_by_grade : dict of int to float
        Haematopoietic area (any unit) graded 0..3.
    frac : float
        The rule's share (0.30).
    margin : float
        How close to ``frac`` a deciding share must lie, as a share of the area.

    Returns
    -------
    int or None
        The grade :func:`apply_grade_rule` would give if the deciding share nearest to ``frac``
        crossed it (a higher grade just short of it, or the graded one just over it), when that
        share lies within ``margin`` of ``frac``; None otherwise.
    """
    total = float(sum(area_by_grade.values()))
    if total <= 0 or margin <= 0:
        return None
    share = {g: area_by_grade.get(g, 0.0) / total for g in range(4)}
    grade = apply_grade_rule(area_by_grade, "eumnet_30pct", frac)
    nearest: tuple[float, int] | None = None
    for g in range(grade + 1, 4):  # a higher grade just short of the share
        d = frac - share[g]
        if 0 < d <= margin and share[g] > 0 and (nearest is None or d < nearest[0]):
            nearest = (d, g)
    d = share[grade] - frac  # the graded one just over it
    if 0 <= d <= margin and (nearest is None or d < nearest[0]):
        fewer = dict(area_by_grade)
        rest = total - area_by_grade.get(grade, 0.0)
        fewer[grade] = (1 - 1e-6) * frac * rest / (1 - frac)  # just under frac of the new total
        other = apply_grade_rule(fewer, "eumnet_30pct", frac)
        if other != grade:
            nearest = (d, other)
    return None if nearest is None else nearest[1]


class ReticulinAnalyzer(Analyzer):
    """Gomori reticulin: fibre length density, intersections, thick fibres and MF grade.

    Parameters
    ----------
    config : ReticulinConfig
        The ``reticulin`` section of the configuration.
    """

    stain = "reticulin"
    map_names = ("labels", "fibres", "skeleton")
    label_classes = (
        LabelClass(EXCLUDED, "excluded", (0, 0, 0)),
        LabelClass(HAEM, "haematopoietic", (70, 90, 200)),
        LabelClass(FAT, "fat", (250, 240, 150)),
        LabelClass(BONE, "bone", (230, 140, 40)),
    )
    cell_classes = ()
    allow_amp = False  # contrasts of 0.02 OD do not survive float16
    # PSS with 1 and 4 tile workers at tile_px 1024 and 2048 (scripts/worker_memory.py, docs/validation.md)
    memory_model_mb = (375.0, 110.0, 140.0, 180.0)
    # the coarsest real reticulin measured: the BoMBR crop at 1.0 µm/px (fibre F1 0.871); fibres
    # are 0.5-2 µm wide, so a coarser scan merges them
    max_scan_mpp = 1.0

    @property
    def window_um(self) -> float:
        return float(self.config.window_um)

    def build_module(self) -> torch.nn.Module:
        c = self.config
        return _ReticulinModule(
            c.mpp,
            tuple(c.ridge_scales_um),
            c.ridge_flank_factor,
            c.tissue_smooth_um,
            c.background_radius_um,
            c.blob_radius_um,
            c.chroma_penalty,
            c.half_max_radius_um,
            c.hysteresis_high_od,
        ).eval()

    def reference_dense(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """The module's dense outputs for one tile, in plain NumPy / SciPy (the peer baseline).

        Parameters
        ----------
        rgb : (H, W, 3) uint8 ndarray
            One tile at the analysis resolution.

        Returns
        -------
        dict of str to ndarray
            The keys of the torch module's output, shaped ``(H, W)`` (batch axis removed):
            float32 maps, ``scale_idx`` uint8 and ``half_max`` bool, so that
            ``post(reference_dense(rgb), rgb, ctx)`` works.

        Notes
        -----
        Gaussian blurs are ``scipy.ndimage.gaussian_filter`` with ``mode="mirror"`` and a
        radius of ``ceil(3 sigma)`` (the module's padding and truncation); the Hessian is the
        central-difference stencil of the blurred image with edge padding; flank samples are
        bilinear (``map_coordinates(order=1, mode="nearest")``); openings are square
        ``grey_opening`` with ``mode="nearest"``.
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb: expected an (H, W, 3) array, got shape {rgb.shape}")
        c = self.config
        mpp = float(c.mpp)
        od = od_from_rgb(rgb)
        lo, hi = od.min(axis=2), od.max(axis=2)
        dark = np.maximum(lo - np.float32(c.chroma_penalty) * (hi - lo), 0).astype(np.float32)

        def blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
            radius = max(1, int(math.ceil(3.0 * sigma_px)))
            return ndi.gaussian_filter(img, sigma_px, mode="mirror", radius=radius).astype(np.float32)

        def square(img: np.ndarray, radius_px: float, op) -> np.ndarray:
            r = int(round(radius_px))
            return img if r <= 0 else op(img, size=(2 * r + 1, 2 * r + 1), mode="nearest")

        h, w = dark.shape
        rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
        best = np.zeros((h, w), np.float32)
        best_idx = np.zeros((h, w), np.uint8)
        for i, s_um in enumerate(c.ridge_scales_um):
            s = float(s_um) / mpp
            g = blur(dark, s)
            gp = np.pad(g, 1, mode="edge")
            hrr = gp[2:, 1:-1] - 2 * g + gp[:-2, 1:-1]
            hcc = gp[1:-1, 2:] - 2 * g + gp[1:-1, :-2]
            hrc = 0.25 * (gp[2:, 2:] - gp[2:, :-2] - gp[:-2, 2:] + gp[:-2, :-2])
            theta = 0.5 * np.arctan2(2 * hrc, hrr - hcc)
            cr, cc = np.cos(theta), np.sin(theta)
            k1 = hrr * cr * cr + 2 * hrc * cr * cc + hcc * cc * cc
            k2 = hrr * cc * cc - 2 * hrc * cr * cc + hcc * cr * cr
            swap = k2 < k1
            nr, nc = np.where(swap, -cc, cr), np.where(swap, cr, cc)
            d = float(c.ridge_flank_factor) * s

            def at(dr: np.ndarray, dc: np.ndarray, g=g) -> np.ndarray:
                return ndi.map_coordinates(g, [rows + dr, cols + dc], order=1, mode="nearest")

            n_plus, n_minus = at(nr * d, nc * d), at(-nr * d, -nc * d)
            t_plus, t_minus = at(-nc * d, nr * d), at(nc * d, -nr * d)
            n_con = np.minimum(g - n_plus, g - n_minus)
            t_con = np.maximum(np.minimum(g - t_plus, g - t_minus), 0)
            t_dark = np.maximum(t_plus, t_minus) - g
            r = np.maximum(n_con - t_con - np.maximum(t_dark - n_con, 0), 0).astype(np.float32)
            better = r > best
            best[better] = r[better]
            best_idx[better] = i

        dark_s = blur(dark, 0.5)
        tophat = dark_s - square(dark_s, c.background_radius_um / mpp, ndi.grey_opening)
        half_max = fibres.half_max_body(tophat, c.half_max_radius_um / mpp, c.hysteresis_high_od)
        smooth_px = float(c.tissue_smooth_um) / mpp
        return {
            "ridge_od": best,
            "scale_idx": best_idx,
            "mean_od": blur(od.mean(axis=2), smooth_px),
            "orange_od": blur(od[..., 2] - od[..., 0], smooth_px),
            "tophat_od": tophat.astype(np.float32),
            "half_max": half_max,
            "wide_dark_od": square(dark_s, c.blob_radius_um / mpp, ndi.grey_opening).astype(np.float32),
        }

    # -- per tile -----------------------------------------------------------------------
    def _tissue_labels(self, dense: dict[str, np.ndarray], ctx: TileContext,
                       rgb: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tissue label map of the whole tile and the collagen-toned mask."""
        c = self.config
        px_um2 = ctx.mpp * ctx.mpp
        mean_od = np.asarray(dense["mean_od"], np.float32)
        orange_od = np.asarray(dense["orange_od"], np.float32)
        h, w = mean_od.shape
        valid = np.zeros((h, w), bool)
        valid[: ctx.valid_px[0], : ctx.valid_px[1]] = True
        if rgb is not None and c.opaque_min_od is not None:
            # black fill is outside the section, like beyond the slide
            opaque = opaque_colour(np.asarray(rgb)[:h, :w], c)
            valid[: opaque.shape[0], : opaque.shape[1]] &= ~opaque

        orange = (orange_od >= c.orange_min_od) & valid
        # bone is pale golden-orange; a dark brown collagen bundle is orange too but absorbs
        # far more (mean OD ~0.8 against ~0.3), and it is fibre, not bone
        bone = orange
        if c.bone_open_um > 0:
            k = 2 * int(math.floor(c.bone_open_um / ctx.mpp)) + 1
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            bone = cv2.morphologyEx(orange.view(np.uint8), cv2.MORPH_OPEN, disk) > 0
        if bone.any():
            lab, n = ndi.label(bone)
            sizes = np.bincount(lab.ravel(), minlength=n + 1)
            od_sum = np.bincount(lab.ravel(), weights=mean_od.ravel(), minlength=n + 1)
            # bone is pale golden-orange; a dark brown collagen bundle is orange too but
            # absorbs far more (mean OD ~0.8 against ~0.3), and it is fibre, not bone
            keep = (sizes * px_um2 >= c.bone_min_um2) & (od_sum <= c.bone_max_od * sizes)
            keep[0] = False
            bone = keep[lab]
        collagen = orange & ~bone

        empty = (mean_od < c.fat_max_od) & ~orange & valid
        lab, n = ndi.label(empty)
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_um2
        fat_lut = (sizes >= c.fat_min_um2) & (sizes < c.excluded_min_um2)
        if c.fat_min_width_um > 0 and fat_lut.any():
            # an adipocyte section is a convex, nearly round space: it holds a disk about as wide
            # as its area says. Pale marrow (megakaryocyte cytoplasm, pale cell clusters) leaves
            # empty spaces of the same area that are narrow and branched; dense
            # fibres cross and darken them, so counting them as fat lost marrow area in
            # fibre-poor marrow only. The widest inscribed disk is twice the largest distance
            # to a non-empty pixel (the tile edge is not one)
            dist_um = cv2.distanceTransform(empty.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * ctx.mpp
            widest = np.zeros(n + 1)
            np.maximum.at(widest, lab[empty], dist_um[empty])
            fat_lut &= 2.0 * widest >= c.fat_min_width_um
        excl_lut = sizes >= c.excluded_min_um2
        fat_lut[0] = excl_lut[0] = False

        labels = np.full((h, w), HAEM, np.uint8)
        fat = fat_lut[lab]
        if c.fat_rim_um > 0 and fat.any():
            # an adipocyte's membrane rim and the septa between adipocytes are fat tissue, not
            # marrow, though they are not empty: grow fat over them
            k = 2 * int(round(c.fat_rim_um / ctx.mpp)) + 1
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            near = cv2.dilate((fat | excl_lut[lab]).view(np.uint8), disk) > 0
            fat |= near & ~empty & ~orange & valid
        labels[fat] = FAT
        labels[bone] = BONE
        labels[excl_lut[lab] | ~valid] = EXCLUDED
        return labels, collagen

    def _blobs(self, dense: dict[str, np.ndarray], ctx: TileContext) -> np.ndarray:
        """Compact dark objects (nuclei, pigment) too wide to be reticulin, (H, W) bool."""
        c = self.config
        cand = np.asarray(dense["wide_dark_od"]) >= c.blob_min_od
        if not cand.any():
            return cand
        lab, n = ndi.label(cand)
        props = regionprops_table(lab, properties=("label", "area", "axis_major_length", "axis_minor_length"))
        area_um2 = props["area"] * ctx.mpp * ctx.mpp
        elong = props["axis_major_length"] / np.maximum(props["axis_minor_length"], 1.0)
        # thick collagen bundles also survive the opening, but they are long
        compact = (area_um2 <= c.blob_max_um2) & (elong <= 2.0)
        lut = np.zeros(n + 1, bool)
        lut[props["label"][compact]] = True
        return lut[lab]

    def _fibres(self, dense: dict[str, np.ndarray], ctx: TileContext):
        c = self.config
        ridge = np.asarray(dense["ridge_od"], np.float32).copy()
        ridge[ctx.valid_px[0] :, :] = 0
        ridge[:, ctx.valid_px[1] :] = 0
        half_max = np.asarray(dense["half_max"], bool)
        # crossings: the ridge contrast vanishes where one fibre's flanks lie on the other,
        # but the fibre body (half-max, top-hat above the seed level) is continuous there
        fill = half_max & (np.asarray(dense["tophat_od"]) >= c.hysteresis_high_od)
        mask = fibres.fibre_mask(ridge, low_od=c.hysteresis_low_od, high_od=c.hysteresis_high_od, fill=fill)
        mask &= half_max
        blobs = self._blobs(dense, ctx)
        if blobs.any():
            # the ridge filter rings around dark nuclei; nothing within the filter's reach of
            # a nucleus is trusted as fibre
            reach = c.blob_halo_um / ctx.mpp
            mask &= distance_to_background(~blobs, np.float64) > reach
        # a hole of one analysis pixel is below what the ridge filter resolves (its smallest
        # scale); its skeleton ring would count a crossing that is not a mesh hole
        mask = fill_enclosed_holes(mask, c.fibre_hole_max_um2 / (ctx.mpp * ctx.mpp))
        skel = skeletonize(mask)
        skel = fibres.prune_spurs(skel, c.spur_um / ctx.mpp)
        if c.min_fibre_um > 0 and skel.any():
            # drop whole fibre pieces (mask components) whose skeleton is too short
            lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
            weights = fibres.skeleton_length_weights(skel)
            length = fibres.label_sums(weights, lab, n) * ctx.mpp
            keep = np.concatenate([[False], length >= c.min_fibre_um])
            mask &= keep[lab]
            skel &= mask
        return mask, skel

    def post(self, dense: dict[str, np.ndarray], rgb: np.ndarray, ctx: TileContext) -> TileResult:
        c = self.config
        mpp = ctx.mpp
        labels, collagen = self._tissue_labels(dense, ctx, rgb)
        mask, skel = self._fibres(dense, ctx)
        haem = labels == HAEM

        weights = fibres.skeleton_length_weights(skel) * mpp  # µm per skeleton pixel
        dist = distance_to_background(mask, np.float64)  # widths and the junction discs of branch_width_px
        width_um = fibres.local_width_px(mask, skel, dist) * mpp
        counted = skel & haem  # fibre measures are per haematopoietic area
        sigma_px = c.overlap_sigma_um / mpp
        cover = w_arm = None
        if c.overlap_sigma_um > 0 and counted.any():
            # where fibres crowd, they overlap and the skeleton of their union is short:
            # Boolean-model correction from the local fibre fraction of the marrow
            cover = fibres.overlap_fraction(mask & haem, haem, sigma_px)
            # a fibre's own width, averaged over ~2 µm of its skeleton away from branch points
            # (at a crossing the mask widens)
            w_arm = fibres.arm_width(skel, width_um, 2.0 / mpp)
            p_len = np.minimum(cover, c.overlap_max_frac)
            if c.overlap_palm:
                # the Boolean model wants the cover of the plane; at a skeleton pixel the window
                # also holds the fibre itself (Slivnyak: the others are as anywhere)
                p_len = fibres.cover_without_own(cover, fibres.own_cover(w_arm, 1, c.overlap_sigma_um),
                                                 max_frac=c.overlap_max_frac)
            weights = weights * fibres.boolean_factor(p_len)
        length_map = np.where(counted, weights, 0.0)
        # thick: the fibre's width along its branch, away from junctions, where a thin fibre
        # crossing a bundle would otherwise read the bundle's width (fibres.branch_width_px)
        branch_um = fibres.branch_width_px(mask, skel, dist=dist) * mpp
        thick_map = np.where(counted & (branch_um > c.thick_width_um), weights, 0.0)

        radius = 0.5 * c.junction_merge_um / mpp
        cents, seen_w = fibres.crossings(skel, radius)
        cross_w = seen_w
        if cover is not None and c.crossing_overlap_exponent > 0:
            # crossings hidden where fibres overlap (holes closed): model-based, / (1 - p) at
            # each branch point, p the local cover without the two crossing fibres' own share
            # (see fibres.crossing_overlap_factor)
            own = fibres.own_cover(w_arm, 2, c.overlap_sigma_um)
            factor = fibres.crossing_overlap_factor(cover, own, c.crossing_overlap_exponent,
                                                    max_frac=c.overlap_max_frac)
            _, cross_w = fibres.crossings(skel, radius, factor)
        if len(cents):
            rr = np.clip(np.floor(cents[:, 0]).astype(int), 0, skel.shape[0] - 1)
            cc = np.clip(np.floor(cents[:, 1]).astype(int), 0, skel.shape[1] - 1)
            # a junction whose centroid falls between skeleton pixels still belongs to the
            # tissue under it; count it where that tissue is haematopoietic
            keep = ctx.in_core(cents[:, 0], cents[:, 1]) & haem[rr, cc] & (cross_w > 0)
            cents, cross_w, seen_w = cents[keep], cross_w[keep], seen_w[keep]

        core = ctx.core
        lab_c = labels[core]
        stats: dict[str, float] = {
            "haem_px": int((lab_c == HAEM).sum()),
            "fat_px": int((lab_c == FAT).sum()),
            "bone_px": int((lab_c == BONE).sum()),
            "excluded_px": int((lab_c == EXCLUDED).sum()),
            "collagen_px": int((collagen[core] & (lab_c == HAEM)).sum()),
            "fibre_px": int((mask[core] & (lab_c == HAEM)).sum()),
            "fibre_length_um": float(length_map[core].sum()),
            "thick_fibre_length_um": float(thick_map[core].sum()),
            # crossings: each branch point holds (deg - 2) / 2 of them (halves possible),
            # times the overlap model's factor; n_junctions_seen: the skeleton's own count
            "n_junctions": float(cross_w.sum()),
            "n_junctions_seen": float(seen_w.sum()),
        }

        # per-window sums: window index = floor(slide_px * mpp / window_um)
        r0, c0 = ctx.core_origin_px
        hc, wc = lab_c.shape
        wr = np.floor((r0 + np.arange(hc)) * mpp / c.window_um).astype(np.int64)
        wcol = np.floor((c0 + np.arange(wc)) * mpp / c.window_um).astype(np.int64)
        ur, ir = np.unique(wr, return_inverse=True)
        uc, ic = np.unique(wcol, return_inverse=True)
        flat = (ir[:, None] * len(uc) + ic[None, :]).ravel()
        nwin = len(ur) * len(uc)

        def per_window(values: np.ndarray) -> np.ndarray:
            return np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=nwin)

        sums = {
            "haem_px": per_window(lab_c == HAEM),
            "bone_px": per_window(lab_c == BONE),
            "collagen_px": per_window(collagen[core] & (lab_c == HAEM)),
            "fibre_length_um": per_window(length_map[core]),
            "thick_fibre_length_um": per_window(thick_map[core]),
        }
        jun = np.zeros(nwin)
        if len(cents):
            jr = np.floor((np.floor(cents[:, 0]) + ctx.origin_px[0]) * mpp / c.window_um).astype(np.int64)
            jc = np.floor((np.floor(cents[:, 1]) + ctx.origin_px[1]) * mpp / c.window_um).astype(np.int64)
            jflat = np.searchsorted(ur, jr) * len(uc) + np.searchsorted(uc, jc)
            jun = np.bincount(jflat, weights=cross_w, minlength=nwin)
        sums["n_junctions"] = jun
        windows: dict[tuple[int, int], dict[str, float]] = {}
        for i in range(nwin):
            key = (int(ur[i // len(uc)]), int(uc[i % len(uc)]))
            windows[key] = {
                k: (int(round(v[i])) if k.endswith("_px") else float(v[i]))
                for k, v in sums.items()
            }

        maps = {
            "labels": labels[core].copy(),
            "fibres": (mask[core] * np.uint8(255)).astype(np.uint8),
            "skeleton": (skel[core] * np.uint8(255)).astype(np.uint8),
        }
        return TileResult(stats=stats, maps=maps, cells={}, windows=windows)

    # -- per slide ----------------------------------------------------------------------
    def window_outputs(self, windows: dict[tuple[int, int], dict[str, float]]) -> dict[str, Any]:
        """The local-grade map: ``local_grades.csv`` (a row per graded grid cell) and ``local_grades.png``.

        The grades are those the slide grade is made of (:func:`local_grades_from_config` on the
        same sums as :meth:`finalize`). In the image each grid cell (``window_um`` a side, the
        slide's top-left cell first) is one block in its grade's colour (:data:`GRADE_RGB`), white
        where not graded.
        """
        c = self.config
        loc = local_grades_from_config(windows, self.mpp, c)
        grades = loc["grades"]
        if grades.size == 0:
            return {}
        r0, c0 = loc["origin"]
        rows = []
        for i, j in zip(*np.nonzero(grades >= 0), strict=True):
            rows.append({"win_row": int(r0 + i), "win_col": int(c0 + j),
                         "x_um": float((c0 + j) * c.window_um), "y_um": float((r0 + i) * c.window_um),
                         "haem_um2": float(loc["haem_um2"][i, j]), "local_grade": int(grades[i, j]),
                         "window_index": float(loc["index"][i, j]),
                         "window_um": float(loc["window_cells_used"][i, j] * c.window_um)})
        # the whole slide from its top-left corner, cells scaled to blocks of up to 1,024 px a side
        full = np.full((r0 + grades.shape[0], c0 + grades.shape[1]), -1, np.int16)
        full[r0:, c0:] = grades
        lut = np.array([*GRADE_RGB, (255, 255, 255)], np.uint8)
        img = lut[np.where(full >= 0, full, 4)]
        k = max(1, 1024 // max(full.shape))
        return {"local_grades.csv": rows, "local_grades.png": np.repeat(np.repeat(img, k, axis=0), k, axis=1)}

    def finalize(
        self,
        totals: dict[str, float],
        windows: dict[tuple[int, int], dict[str, float]],
        *,
        age: float | None = None,
    ) -> dict[str, Any]:
        c = self.config
        mpp = self.mpp
        px_um2 = mpp * mpp
        haem_um2 = float(totals.get("haem_px", 0)) * px_um2
        bone_um2 = float(totals.get("bone_px", 0)) * px_um2
        fat_um2 = float(totals.get("fat_px", 0)) * px_um2
        collagen_um2 = float(totals.get("collagen_px", 0)) * px_um2
        tissue_um2 = haem_um2 + bone_um2 + fat_um2

        slide = window_readouts(totals, mpp)
        _, index = grade_from_measurements(slide, c.grade_thresholds)

        loc = local_grades_from_config(windows, mpp, c)
        area_by_grade = loc["area_by_grade"]
        n_graded = int((loc["grades"] >= 0).sum())
        graded_um2 = sum(area_by_grade.values())
        if n_graded == 0:
            # too little marrow for any window: grade the slide as one window
            grade, _ = grade_from_measurements(slide, c.grade_thresholds)
            if haem_um2 > 0:
                area_by_grade[grade] = haem_um2
                graded_um2 = haem_um2
            log.info("reticulin: no window had enough haematopoietic area; graded the slide as a whole")
        else:
            grade = apply_grade_rule(area_by_grade, c.grade_rule, c.grade_rule_frac)
        local = {
            GRADE_NAMES[g]: (area_by_grade[g] / graded_um2 if graded_um2 > 0 else 0.0) for g in range(4)
        }
        readouts = {
            "fibre_length_um_per_1e4um2": slide["fibre_length_um_per_1e4um2"],
            "intersections_per_mm2": slide["intersections_per_mm2"],
            "thick_fibre_frac": slide["thick_fibre_frac"],
            "collagen_area_frac": collagen_um2 / haem_um2 if haem_um2 > 0 else 0.0,
            "bone_area_frac": bone_um2 / tissue_um2 if tissue_um2 > 0 else 0.0,
            "mf_grade": int(grade),
            "fibrosis_index": float(index),
            "local_grade_frac": local,
            "grade_rule": c.grade_rule,
            # the other grade when the rule's deciding share lies within the margin of its threshold
            "mf_grade_borderline_with": (
                borderline_grade(area_by_grade, c.grade_rule_frac, c.grade_borderline_margin)
                if c.grade_rule == "eumnet_30pct" and n_graded > 0 else None),
        }
        return {
            "readouts": readouts,
            "areas_um2": {
                "haematopoietic": haem_um2,
                "fat": fat_um2,
                "bone": bone_um2,
                "collagen": collagen_um2,
                "excluded": float(totals.get("excluded_px", 0)) * px_um2,
            },
            "counts": {
                "fibre_length_um": float(totals.get("fibre_length_um", 0.0)),
                "thick_fibre_length_um": float(totals.get("thick_fibre_length_um", 0.0)),
                # crossings (halves possible), with the overlap model's correction
                "n_junctions": float(totals.get("n_junctions", 0.0)),
                # crossings the skeleton shows, before that correction
                "n_junctions_seen": float(totals.get("n_junctions_seen", 0.0)),
                "n_windows_graded": int(n_graded),  # grid cells with a local grade
            },
            "measurements": {
                "window_um": c.window_um,  # grid cell side
                "grade_window_um": float(loc["window_cells"] * c.window_um),  # local grade measured over
                "grade_window_placement": c.grade_window_placement,
                # haematopoietic area whose window grade a surrounding focus replaced
                "local_grade_absorbed_um2": float(loc["haem_um2"][loc["grades"] != loc["window_grades"]].sum())
                if loc["haem_um2"].size else 0.0,
                "length_estimator": "Vossepoel-Smeulders chain code (0.980 even, 1.406 odd, -0.091 corner) "
                "x Boolean-model overlap factor -ln(1-p)/p, p = local fibre fraction of the marrow"
                + (" less the fibre's own share (Palm/Slivnyak)" if c.overlap_palm else ""),
                "crossing_estimator": "sum of (deg-2)/2 over skeleton branch points / (1 - p) ** "
                f"{c.crossing_overlap_exponent:g} (holes closed by overlap, Poisson-line model; p = local fibre "
                "fraction less the crossing fibres' own share)",
                "local_grade_area_um2": {GRADE_NAMES[g]: area_by_grade[g] for g in range(4)},
            },
        }
