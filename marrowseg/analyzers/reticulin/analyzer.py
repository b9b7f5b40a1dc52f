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
from marrowseg.analyzers.reticulin.dense import _ReticulinModule
from marrowseg.analyzers.reticulin.grading import (
    apply_grade_rule,
    borderline_grade,
    grade_from_measurements,
)
from marrowseg.analyzers.reticulin.local import local_grades_from_config, window_readouts
from marrowseg.analyzers.tissue import opaque_colour
from marrowseg.stains import od_from_rgb
from marrowseg.tiling import fill_enclosed_holes

__all__ = ["ReticulinAnalyzer"]


log = logging.getLogger(__name__)


EXCLUDED, HAEM, FAT, BONE = 0, 1, 2, 3


GRADE_NAMES = ("MF-0", "MF-1", "MF-2", "MF-3")


#: display colours of MF-0..MF-3 (local-grade map, report heatmap)
GRADE_RGB: tuple[tuple[int, int, int], ...] = ((60, 170, 90), (245, 205, 60), (240, 130, 40), (200, 30, 40))


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
