"""What the H&E and E-cadherin analyzers share: marrow tissue classes on a coarser class grid.

Both classify tissue every ``k`` analysis pixels (:func:`marrowseg.analyzers.tissue.class_factor`),
write that label map downsampled by ``k`` on a slide-aligned grid, and count per slide-aligned
window. :class:`MarrowAnalyzer` holds the tile geometry of that grid; the stains' own steps
(stain separation, nuclei, readouts) stay in their analyzers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from marrowseg.analyzers import tissue as tis
from marrowseg.analyzers.base import Analyzer, LabelClass, TileContext
from marrowseg.analyzers.crush import crush_like, crush_zone, fat_in_crush

__all__ = ["MarrowAnalyzer", "index_runs", "nuclear_log_area_sum", "nuclear_scale", "crush_measurement",
           "NUCLEAR_SCALE_MIN_CELLS"]

log = logging.getLogger(__name__)

#: fewer cells than this and the nuclear scale is not judged (a field with a few nuclei says nothing)
NUCLEAR_SCALE_MIN_CELLS = 30


def nuclear_log_area_sum(area_um2: np.ndarray) -> float:
    """Sum of ln(nuclear area / µm²) over a tile's cells: with the cell count, additive per tile, so
    the slide's geometric mean nuclear area is an exact sum of per-tile quantities."""
    return float(np.log(np.maximum(np.asarray(area_um2, np.float64), 1e-3)).sum())


def crush_measurement(totals: Mapping[str, float], px_um2: float, marrow_um2: float) -> dict[str, Any]:
    """The slide's area left out as crush artefact (µm², part of the excluded area) and its share of
    what would have been marrow space (marrow + crush), None without marrow."""
    crush_um2 = float(totals.get("crush_px", 0)) * px_um2
    whole = crush_um2 + marrow_um2
    return {"area_um2": crush_um2, "share_of_marrow": crush_um2 / whole if whole > 0 else None}


def nuclear_scale(totals: Mapping[str, float], expected_um2: list[float] | None) -> dict[str, Any]:
    """Geometric mean nuclear area of the slide (µm²) against the range marrow nuclei read at the right pixel size.

    A wrong pixel size (``--mpp``, or metadata in the wrong unit) scales every area and density of
    the slide; the nuclei are the one ruler every marrow slide carries. ``outside`` is True when
    the mean lies outside ``expected_um2`` (a QA flag and a report line, not an error: nuclei of a
    blast-rich marrow run large).
    """
    n = int(totals.get("n_nucleated", 0))
    out: dict[str, Any] = {"cells": n, "expected_um2": None if expected_um2 is None else [float(v) for v in expected_um2],
                           "geomean_area_um2": None, "outside": False}
    if n < NUCLEAR_SCALE_MIN_CELLS:
        return out
    gm = math.exp(float(totals.get("nuclear_log_area_sum", 0.0)) / n)
    out["geomean_area_um2"] = gm
    if expected_um2 is not None and not (expected_um2[0] <= gm <= expected_um2[1]):
        out["outside"] = True
        log.warning("nuclei measure %.1f µm² on average (geometric mean of %d), outside the %g-%g µm² of marrow "
                    "nuclei: is the pixel size right?", gm, n, *expected_um2)
    return out


def index_runs(idx: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Values of a non-decreasing index array and the [start, stop) range each one covers."""
    vals, starts = np.unique(idx, return_index=True)
    stops = np.append(starts[1:], len(idx))
    return vals, [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


class MarrowAnalyzer(Analyzer):
    """An analyzer whose tissue classes lie on a grid ``k`` analysis pixels apart.

    Subclasses set ``self.k`` (the class grid factor) in ``__init__`` and keep ``window_um``
    (µm, or null) in their config.
    """

    k: int
    label_classes: ClassVar[tuple[LabelClass, ...]] = tis.LABEL_CLASSES
    needs_colour: ClassVar[bool] = True  # haematoxylin is told from eosin / DAB by hue: greyscale is refused

    @property
    def map_downsample(self) -> int:
        return self.k

    @property
    def window_um(self) -> float | None:
        return None if self.config.window_um is None else float(self.config.window_um)

    def _valid_box(self, d: dict[str, np.ndarray], ctx: TileContext) -> tuple[dict[str, np.ndarray], int, int]:
        """The tile's dense maps cut to the part inside the slide, rounded up to whole class cells.

        Beyond the slide there is only white padding. Maps at the analysis resolution (the
        shape of ``h_od``) keep ``vr x vc`` pixels, maps at the class resolution ``vr/k x vc/k``.

        Returns
        -------
        d : dict of str to ndarray
            A new dict of views.
        vr, vc : int
            Rows and columns kept at the analysis resolution, px.
        """
        k = self.k
        full = d["h_od"].shape
        vr = min(full[0], -(-int(ctx.valid_px[0]) // k) * k)
        vc = min(full[1], -(-int(ctx.valid_px[1]) // k) * k)
        return {key: v[:vr, :vc] if v.shape == full else v[: vr // k, : vc // k] for key, v in d.items()}, vr, vc

    def _geometry(self, ctx: TileContext, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Valid (inside-slide) and open-border masks at the class resolution.

        ``shape`` is the (possibly cropped) tile shape at the analysis resolution.
        """
        k = self.k
        hc, wc = -(-shape[0] // k), -(-shape[1] // k)
        vr = min(shape[0], int(ctx.valid_px[0]))
        vc = min(shape[1], int(ctx.valid_px[1]))
        vrc, vcc = -(-vr // k), -(-vc // k)
        valid = np.zeros((hc, wc), bool)
        valid[:vrc, :vcc] = True
        border = np.zeros((hc, wc), bool)
        # A tile edge is interior to the slide when the grid cut the slide there: above and
        # left when the tile does not start at 0; below and right when the core stops
        # short of the slide pixels the tile holds (the last tile's core runs to the slide edge).
        if ctx.origin_px[0] > 0:
            border[0, :] = True
        if ctx.origin_px[1] > 0:
            border[:, 0] = True
        if ctx.core[0].stop < vr:
            border[vrc - 1, :] = True
        if ctx.core[1].stop < vc:
            border[:, vcc - 1] = True
        return valid, border & valid

    @staticmethod
    def _tissue_stats(core_labels: np.ndarray) -> dict[str, float]:
        """Pixels of each tissue class in the tile's core (analysis resolution)."""
        counts = np.bincount(core_labels.ravel(), minlength=4)
        return {
            "excluded_px": int(counts[tis.EXCLUDED]),
            "haematopoietic_px": int(counts[tis.HAEMATOPOIETIC]),
            "fat_px": int(counts[tis.FAT]),
            "bone_px": int(counts[tis.BONE]),
        }

    def _leave_out_crush(self, labels_c: np.ndarray, fat: tis.FatObjects | None, h_od: np.ndarray, h_ctx: np.ndarray,
                         class_mpp: float, cfg: Any) -> tuple[np.ndarray, tis.FatObjects | None, np.ndarray]:
        """Crushed marrow and the fat spaces inside it made excluded (:mod:`marrowseg.analyzers.crush`).

        Called before the nuclei are looked for: crushed strands are no cells to count. Returns the
        new class labels, the fat spaces less those in the crush (a squeezed space is no adipocyte to
        count or size), and the crushed class pixels.
        """
        marrow_c, fat_c = labels_c == tis.HAEMATOPOIETIC, labels_c == tis.FAT
        crush_c = crush_like(h_od, self.k, h_ctx, marrow_c, class_mpp, cfg)
        crush_c = crush_zone(crush_c, class_mpp, cfg.close_um) & (marrow_c | fat_c)
        crush_c |= fat_in_crush(fat_c, marrow_c, crush_c, class_mpp, cfg.fat_band_um)
        labels_c = np.where(crush_c, np.asarray(tis.EXCLUDED, labels_c.dtype), labels_c)
        if fat is not None and fat.row.size:
            r = np.clip(np.round(fat.row).astype(int), 0, crush_c.shape[0] - 1)
            c = np.clip(np.round(fat.col).astype(int), 0, crush_c.shape[1] - 1)
            keep = ~crush_c[r, c]
            fat = tis.FatObjects(fat.row[keep], fat.col[keep], fat.area_px[keep])
        return labels_c, fat, crush_c

    def _crush_px(self, crush_c: np.ndarray, shape: tuple[int, int], ctx: TileContext) -> int:
        """Crushed analysis pixels in the tile's core (additive per tile, as every class area)."""
        return int(np.count_nonzero(tis.upsample_labels(crush_c.view(np.uint8), self.k, shape)[ctx.core]))

    def _map(self, labels: np.ndarray, ctx: TileContext) -> np.ndarray:
        """The core's labels on the slide-aligned grid of every k-th analysis pixel."""
        k = self.k
        r0, c0 = ctx.core_origin_px
        core = labels[ctx.core]
        return np.ascontiguousarray(core[(-r0) % k :: k, (-c0) % k :: k])

    def _window_blocks(self, core_labels: np.ndarray, cells: dict[str, np.ndarray],
                       ctx: TileContext) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
        """Each slide-aligned window (side ``window_um``) the tile's core meets.

        Yields
        ------
        key : (int, int)
            The window's (row, col) index, ``floor(slide µm / window_um)``.
        class_px : (4,) int ndarray
            Core pixels of each tissue class in the window.
        in_window : (N,) bool ndarray
            The rows of ``cells`` (tile ``row`` / ``col``, px) whose pixel lies in the window.
        """
        mpp = float(ctx.mpp)
        win = float(self.config.window_um)
        r0, c0 = ctx.core_origin_px
        h, w = core_labels.shape
        wr = np.floor((r0 + np.arange(h)) * mpp / win).astype(np.int64)
        wc = np.floor((c0 + np.arange(w)) * mpp / win).astype(np.int64)
        cr = np.floor((ctx.origin_px[0] + np.floor(cells["row"])) * mpp / win).astype(np.int64)
        cc = np.floor((ctx.origin_px[1] + np.floor(cells["col"])) * mpp / win).astype(np.int64)
        # window indices grow with the pixel index: each window is a contiguous block (a view)
        for i, (ra, rb) in zip(*index_runs(wr), strict=True):
            for j, (ca, cb) in zip(*index_runs(wc), strict=True):
                n = np.bincount(core_labels[ra:rb, ca:cb].ravel(), minlength=4)
                yield (int(i), int(j)), n, (cr == i) & (cc == j)
