"""E-cadherin IHC analyzer: erythroid left shift from membrane DAB on early precursors.

Dense step (torch, on the device): optical density, haematoxylin/DAB deconvolution with
vectors estimated per slide in :meth:`ECadAnalyzer.prepare` (Ruifrok H-DAB when the estimate
is unreliable), the smoothed maps of the nuclear detector and the pooled maps of the tissue
classes. Per tile (CPU): tissue labels (:mod:`marrowseg.analyzers.tissue`), nuclei and their
morphology classes (:mod:`marrowseg.analyzers.nuclei`, the same late-erythroid rules as
H&E), a DAB score per nucleus (membrane ring or nucleus), the positive call, and clusters
of positive cells. With ``negative_nuclei`` set, the nuclei found negative are detected a
second time with that detector (distance seeds split touching nuclei), while positive and
megakaryocyte nuclei keep their first region. With the membrane compartment, late-erythroid
calls must also pass the analyzer's own tests (:meth:`ECadAnalyzer._late_rules`: an OD that
rises with nuclear area, a pale rim, :func:`rim_density`, with enough pale pixels), a
positive call that no closed membrane encloses must score like the enclosed ones
(:meth:`ECadAnalyzer._open_positives`: a negative cell borrows its positive neighbours'
membranes on one side only), E-cad+ cells whose nucleus the detector missed are added from
their closed membrane (:func:`ring_enclosed_cells`), and pale nuclei below the nuclear mask
(myeloid nuclei, caps) from their local contrast
(:func:`faint_nuclei`, cells that count in the nucleated total: ``other``, late
erythroid when round, solid, even and dense enough, :meth:`ECadAnalyzer._late_faint`, or
E-cad+ inside a small closed membrane).
``finalize`` forms every ratio from the summed counts.

Clusters (sheets of positive cells, :func:`sheet_members` and :func:`count_clusters`) are
counted exactly once per slide: a tile reports the clusters whose lowest (row, col) member
lies in its core, built from the cells of the whole tile (halo included). That is exact for
clusters that fit in the halo (extent below about ``halo_um`` minus one link and one
neighbourhood); larger sheets may be cut by the tile edge and counted more than once, and the
tile then also counts them in ``n_ecad_clusters_truncated``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from marrowseg import stains
from marrowseg.analyzers import nuclei as nuc
from marrowseg.analyzers import tissue as tis
from marrowseg.analyzers.base import LabelClass, TileContext, TileResult
from marrowseg.analyzers.ecad.clusters import count_clusters, sheet_members
from marrowseg.analyzers.ecad.dab_level import dab_scale
from marrowseg.analyzers.ecad.membrane import (
    _region_means,
    _rim_stats,
    inside_enclosure,
    membrane_enclosures,
    ring_enclosed_cells,
    ring_scores,
    unstained_part,
)
from marrowseg.analyzers.ecad.readouts import (
    _cluster_note,
    _range_verdict,
    fraction_range,
    wilson_interval,
)
from marrowseg.analyzers.ecad.stain import (
    ECadModule,
    estimate_hdab_vectors,
    haematoxylin_scale,
    hdab_matrix,
    stains_from_rgb,
)
from marrowseg.analyzers.marrow import (
    MarrowAnalyzer,
    crush_measurement,
    nuclear_log_area_sum,
    nuclear_scale,
)
from marrowseg.analyzers.nuclei import faint_nuclei
from marrowseg.config.ecad import ECadConfig, ECadReference, load_ecad_reference

__all__ = ["CELL_CLASSES", "ECadAnalyzer"]


log = logging.getLogger(__name__)


#: values of the ``class`` column of cells.csv
CELL_CLASSES = ("ecad_pos", "late_erythroid", "megakaryocyte", "other")


_MEAS_COLUMNS = ("area_um2", "eccentricity", "solidity", "h_od_mean", "h_od_cv")


class ECadAnalyzer(MarrowAnalyzer):
    """E-cadherin-positive early erythroid precursors and the erythroid left shift.

    Parameters
    ----------
    config : ECadConfig
        The ``ecad`` section of the configuration.
    """

    stain: ClassVar[str] = "ecad"
    cell_classes: ClassVar[tuple[LabelClass, ...]] = (
        LabelClass(1, "ecad_pos", (160, 80, 0)),
        LabelClass(2, "late_erythroid", (220, 30, 30)),
        LabelClass(3, "megakaryocyte", (30, 30, 220)),
        LabelClass(4, "other", (30, 180, 30)),
    )
    allow_amp: ClassVar[bool] = False  # OD thresholds near 0.15 do not survive float16 logs
    # the membrane ring is 1 µm wide: Ki67 tiles resampled to 1.0 µm/px lose a quarter of their
    # detections (recall 0.71 -> 0.54, docs/validation.md); a 20x scan at ~0.5 µm/px is fine
    max_scan_mpp: ClassVar[float | None] = 0.6
    # 384 µm a side at 0.5 µm/px: ~100-700 nuclei a patch from fatty to packed marrow
    sample_patch_px: ClassVar[int] = 768
    # PSS with 1 and 4 tile workers at tile_px 1024 and 2048 (scripts/worker_memory.py, docs/validation.md)
    memory_model_mb: ClassVar[tuple[float, float, float, float]] = (440.0, 25.0, 50.0, 80.0)

    def __init__(self, config: ECadConfig, reference: ECadReference | None = None) -> None:
        super().__init__(config)
        self.rgb_from_stains = hdab_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)
        self.vectors_source = "standard"
        self.h_scale = 1.0
        self.dab_scale = 1.0
        self.clear_level: float | None = None  # summed OD of glass and fat lumen (prepare)
        self.k = tis.class_factor(config.mpp, config.tissue.classes.class_mpp)
        self.reference = reference if reference is not None else load_ecad_reference()

    # -- dense ----------------------------------------------------------------------------
    def prepare(self, sample_rgb: np.ndarray, patches: Sequence[np.ndarray] = ()) -> dict[str, Any]:
        """Estimate the slide's H and DAB vectors (fallback: Ruifrok H-DAB, with the reason)
        from the sample's pixels, its counterstain scale from the nuclei of ``patches`` and its
        DAB scale from their closed membrane rings (:func:`dab_scale`; no patches: no scaling)."""
        sample_rgb = tis.without_opaque(sample_rgb, self.config.tissue.classes)
        m, info = estimate_hdab_vectors(sample_rgb, self.config.stain)
        self.clear_level = tis.slide_clear_level(sample_rgb, self.config.tissue.classes)
        if self.clear_level is not None:
            info["clear_od_level"] = self.clear_level
        if info["stain_vectors_source"] == "standard" and self.config.stain.vectors == "estimate":
            log.warning("E-cadherin stain vectors: standard Ruifrok H-DAB used: %s", info["fallback_reason"])
        scale, sinfo = haematoxylin_scale(patches, m, float(self.config.mpp), self.config.stain,
                                          self.config.tissue.classes)
        info.update(sinfo)
        # the nuclear thresholds are absolute: an unscaled or clipped counterstain shifts every count
        if "h_scale_fallback_reason" in sinfo:
            log.warning("E-cadherin %s", sinfo["h_scale_fallback_reason"])
        elif sinfo.get("h_scale_clipped"):
            log.warning("E-cadherin counterstain scale clipped to %.2f (nuclear level %.2f OD)",
                        scale, sinfo["h_level_od"])
        dscale, dinfo = dab_scale(patches, stains_from_rgb(m, scale), float(self.config.mpp), self.config,
                                  self.config.tissue.classes)
        info.update(dinfo)
        # the positivity threshold is absolute: an unscaled or clipped DAB shifts the positive count
        if "dab_scale_note" in dinfo:
            log.info("E-cadherin %s", dinfo["dab_scale_note"])
        elif dinfo.get("dab_scale_clipped"):
            log.warning("E-cadherin DAB scale clipped to %.2f (membrane level %.2f OD)", dscale, dinfo["dab_level_od"])
        self.rgb_from_stains = m
        self.h_scale = scale
        self.dab_scale = dscale
        self.vectors_source = info["stain_vectors_source"]
        self._module = None
        return info

    def build_module(self) -> torch.nn.Module:
        return ECadModule(self.rgb_from_stains, self.config, h_scale=self.h_scale, dab_scale=self.dab_scale).eval()

    def reference_dense(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """The module's dense outputs for one tile in plain NumPy / SciPy (the peer baseline).

        Parameters
        ----------
        rgb : (H, W, 3) uint8 ndarray
            One tile, bright background.

        Returns
        -------
        dict of str to ndarray
            The keys of :class:`ECadModule`'s output, each float32 and shaped like it
            without the batch axis: ``(1, H, W)`` at the analysis resolution (``h_od``,
            ``dab_od``, ``det_od``, ``peak``, ``mask``), ``(1, ceil(H/k), ceil(W/k))`` at the
            tissue-class resolution (``bright``, ``h_ctx``, ``e_ctx``, ``clear_od``);
            ``post(reference_dense(rgb), rgb, ctx)`` works.

        Raises
        ------
        ValueError
            ``rgb`` is not (H, W, 3).

        Notes
        -----
        Uses the stain matrix and the counterstain and DAB scales set by :meth:`prepare`. Gaussian blurs
        are ``scipy.ndimage.gaussian_filter`` (``mode="mirror"``, radius ``ceil(3 sigma)``,
        the module's padding and truncation); the matrix/nuclear split is
        ``scipy.ndimage.grey_opening`` with a square window and ``mode="nearest"`` (the
        module's replicate padding).
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb: expected an (H, W, 3) array, got shape {rgb.shape}")
        cfg = self.config
        mpp = float(cfg.mpp)
        od = stains.od_from_rgb(rgb)
        conc = od @ stains_from_rgb(self.rgb_from_stains, self.h_scale, self.dab_scale).astype(np.float32)
        h = np.maximum(conc[..., 0], 0.0)
        dab = np.maximum(conc[..., 1], 0.0)
        det = h + dab if cfg.positivity_compartment == "nucleus" else h
        out = {"h_od": h, "dab_od": dab, "det_od": det}
        out.update(nuc.reference_maps(det, mpp, cfg.nuclei))
        w = 2 * max(1, int(round(cfg.tissue.opening_um / mpp / 2))) + 1
        matrix = ndi.grey_opening(h, size=(w, w), mode="nearest")
        out.update(tis.reference_maps(od.sum(axis=2), np.stack([h - matrix, matrix], axis=-1), mpp,
                                      cfg.tissue.classes))
        return {key: np.asarray(v, np.float32)[None] for key, v in out.items()}

    # -- per tile -------------------------------------------------------------------------
    def classify_cells(self, table: dict[str, np.ndarray], score_od: np.ndarray,
                       may_be_positive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Positive call and class of each nucleus.

        ``may_be_positive`` (N,) bool, optional: only these rows can be called positive
        (pieces of a region found negative as a whole stay negative).

        Returns
        -------
        positive : (N,) bool ndarray
            DAB score at or above the compartment's threshold.
        classes : (N,) object ndarray of str
            With the membrane compartment ``megakaryocyte`` by size first (megakaryocytes
            are E-cadherin negative; a neighbour's membrane must not relabel them), then
            ``ecad_pos``; with the nucleus compartment ``ecad_pos`` first (the score is the
            nucleus's own DAB, and large proliferating nuclei are stained), then the
            morphology class of the H&E rules (``late_erythroid`` or ``other``); for the
            membrane compartment with the E-cadherin analyzer's neighbour tests
            (:meth:`_late_caps`: crowded late calls, small caps).
        """
        cfg = self.config
        thr = cfg.membrane_min_dab_od if cfg.positivity_compartment == "membrane" else cfg.nucleus_min_dab_od
        positive = np.asarray(score_od) >= thr
        if may_be_positive is not None:
            positive &= np.asarray(may_be_positive, bool)
        morph = nuc.classify_nuclei(table, cfg.classes)
        if cfg.positivity_compartment == "membrane":
            classes = np.where(morph == "megakaryocyte", "megakaryocyte", np.where(positive, "ecad_pos", morph))
            classes = self._late_caps(table, classes.astype(object), self.mpp)
        else:  # a nucleus's own DAB: no neighbour can lend it, and a large stained nucleus is positive
            classes = np.where(positive, "ecad_pos", morph).astype(object)
        return positive & (classes == "ecad_pos"), classes

    def _scores(self, labels: np.ndarray, table: dict[str, np.ndarray], dab_od: np.ndarray,
                mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ring DAB, nuclear DAB and the score of the configured compartment, per nucleus (OD)."""
        cfg = self.config
        ring_od = ring_scores(labels, table, dab_od, mpp, gap_um=cfg.ring_gap_um,
                              width_um=cfg.ring_width_um, sectors=cfg.ring_sectors,
                              min_own_sectors=cfg.ring_min_own_sectors)
        nucleus_od = _region_means(dab_od, labels, table["label"])
        return ring_od, nucleus_od, (ring_od if cfg.positivity_compartment == "membrane" else nucleus_od)

    def _redetect_negatives(self, d: dict[str, np.ndarray], labels: np.ndarray, table: dict[str, np.ndarray],
                            score: np.ndarray, allowed: np.ndarray,
                            mpp: float) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Keep the positive and megakaryocyte nuclei of the first detection; detect the rest again.

        The negative cells (late normoblasts, myeloid cells, lymphocytes) are packed and
        touch; a detector that splits touching nuclei (``negative_nuclei``, distance seeds)
        finds more of them, but it would also cut the larger E-cad+ nuclei, whose count is
        the readout, and the lobes of a megakaryocyte: those keep their first region.

        Parameters
        ----------
        d : dict of str to (H, W) ndarray
            The tile's dense maps (``det_od``, ``peak``, ``mask``).
        labels, table : ndarray, dict
            The first detection (``cfg.nuclei``).
        score : (N,) ndarray
            DAB score of each first-detection nucleus, OD.
        allowed : (H, W) bool ndarray
            Where nucleus centres may lie.
        mpp : float
            µm/px.

        Returns
        -------
        labels : (H, W) int32 ndarray
            Kept regions and the new negative regions.
        table : dict of str to (M,) ndarray
            Their nucleus table (:data:`marrowseg.analyzers.nuclei.NUCLEUS_COLUMNS`).
        may_be_positive : (M,) bool ndarray
            Rows that are first-detection positive nuclei (the others were part of a region
            found negative as a whole).
        """
        cfg = self.config
        thr = cfg.membrane_min_dab_od if cfg.positivity_compartment == "membrane" else cfg.nucleus_min_dab_od
        old_pos = np.asarray(score) >= thr
        kept = old_pos | (nuc.classify_nuclei(table, cfg.classes) == "megakaryocyte")
        kept_mask = np.isin(labels, table["label"][kept])
        if cfg.positivity_compartment == "nucleus" and cfg.nucleus_stained_fraction is not None and old_pos.any():
            kept_mask &= ~unstained_part(np.isin(labels, table["label"][old_pos]), d["dab_od"],
                                         cfg.nucleus_stained_fraction * thr, mpp)
        ncfg = cfg.negative_nuclei
        same = (ncfg.peak_sigma_um == cfg.nuclei.peak_sigma_um) and (ncfg.mask_sigma_um == cfg.nuclei.mask_sigma_um)
        neg, _ = nuc.detect_nuclei(d["det_od"], mpp, ncfg, peak_map=d["peak"] if same else None,
                                   mask_map=d["mask"] if same else None, allowed=allowed & ~kept_mask)
        neg[kept_mask] = 0  # a new region's watershed may have spread into a kept one
        offset = int(neg.max())
        out = np.where(kept_mask, labels + offset, neg).astype(np.int32)
        out, new_table = nuc.measure_labels(out, d["det_od"], mpp, ncfg.min_area_um2)
        pos_by_old = np.zeros(int(labels.max()) + 1, bool)
        pos_by_old[table["label"][old_pos]] = True
        old_label = np.where(new_table["label"] > offset, new_table["label"] - offset, 0)
        return out, new_table, pos_by_old[old_label]

    def post(self, dense: dict[str, np.ndarray], rgb: np.ndarray, ctx: TileContext) -> TileResult:
        cfg = self.config
        mpp = float(ctx.mpp)
        k = self.k
        d = {key: np.asarray(v, dtype=np.float32).reshape(np.shape(v)[-2:]) for key, v in dense.items()}
        d, vr, vc = self._valid_box(d, ctx)
        shape = d["h_od"].shape
        valid_c, border_c = self._geometry(ctx, shape)
        # black fill and marker ink: outside the section, and no stain
        valid_c, border_c = tis.exclude_opaque(rgb[:vr, :vc], k, cfg.tissue.classes, valid_c, border_c, d,
                                               ("det_od", "h_od", "dab_od", "peak", "mask"))
        labels_c, _ = tis.classify_tissue(d["bright"], d["h_ctx"], d["e_ctx"], mpp * k, cfg.tissue.classes,
                                          valid=valid_c, open_border=border_c, clear_od=d.get("clear_od"),
                                          clear_level=self.clear_level)
        crush_cfg = cfg.tissue.classes.crush
        crush_c = None
        if crush_cfg is not None:
            labels_c, _, crush_c = self._leave_out_crush(labels_c, None, d["h_od"], d["h_ctx"], mpp * k, crush_cfg)
        labels = tis.upsample_labels(labels_c, k, shape)
        core_labels = labels[ctx.core]
        stats = self._tissue_stats(core_labels)
        if crush_c is not None:
            stats["crush_px"] = self._crush_px(crush_c, shape, ctx)

        allowed = (labels == tis.HAEMATOPOIETIC) | (labels == tis.FAT)
        nuc_labels, table = nuc.detect_nuclei(d["det_od"], mpp, cfg.nuclei, peak_map=d["peak"],
                                              mask_map=d["mask"], allowed=allowed)
        ring_od, nucleus_od, score = self._scores(nuc_labels, table, d["dab_od"], mpp)
        may_be_positive = None
        if cfg.negative_nuclei is not None and len(table["label"]):
            nuc_labels, table, may_be_positive = self._redetect_negatives(d, nuc_labels, table, score, allowed, mpp)
            ring_od, nucleus_od, score = self._scores(nuc_labels, table, d["dab_od"], mpp)
        positive, classes = self.classify_cells(table, score, may_be_positive)
        turned = np.zeros(len(positive), bool)  # positive calls turned negative by the open-membrane rule
        membrane = cfg.positivity_compartment == "membrane"
        enclosures = None
        if membrane and cfg.ring_holes is not None:
            enclosures = membrane_enclosures(d["dab_od"], mpp, dab_min_od=cfg.ring_holes.dab_min_od,
                                             sigma_um=cfg.ring_holes.sigma_um)
            if cfg.open_membrane is not None:
                stays = self._open_positives(table, positive, score, enclosures)
                if not stays.all():
                    ok = stays if may_be_positive is None else stays & np.asarray(may_be_positive, bool)
                    was = positive
                    positive, classes = self.classify_cells(table, score, ok)
                    turned = was & ~positive
        if membrane:
            classes = self._late_rules(d, nuc_labels, table, classes, mpp)
        hole_labels = None
        if enclosures is not None:
            table, classes, positive, ring_od, nucleus_od, hole_labels = self._add_ring_enclosed(
                d, table, classes, positive, ring_od, nucleus_od, allowed, mpp, enclosures)
        n_before_faint = len(positive)
        if cfg.faint_nuclei is not None:  # either compartment: pale nuclei are nucleated cells too
            table, classes, positive, ring_od, nucleus_od = self._add_faint(
                d, nuc_labels, hole_labels, table, classes, positive, ring_od, nucleus_od,
                labels == tis.HAEMATOPOIETIC, mpp, enclosures if cfg.faint_enclosed_positive else None)

        keep = ctx.in_core(table["row"], table["col"])
        # what the two closed-membrane rules changed, for the record (metrics.json counts)
        stats["n_ecad_open_turned_negative"] = int((turned & keep[:len(turned)]).sum())
        stats["n_ecad_pos_pale_enclosed"] = int((positive[n_before_faint:] & keep[n_before_faint:]).sum())
        cells = {"row": table["row"][keep], "col": table["col"][keep], "class": classes[keep].astype(str),
                 "dab_ring_od": ring_od[keep], "dab_nucleus_od": nucleus_od[keep]}
        for c in _MEAS_COLUMNS:
            cells[c] = table[c][keep]
        stats["n_nucleated"] = int(keep.sum())
        stats["nuclear_log_area_sum"] = nuclear_log_area_sum(cells["area_um2"])
        for name in CELL_CLASSES:
            stats[f"n_{name}"] = int((classes[keep] == name).sum())

        n_cl, n_trunc, member = self._clusters(table, positive, ctx, shape)
        cells["ecad_cluster"] = member[keep].astype(np.int8)
        stats["n_ecad_clusters"] = n_cl
        stats["n_ecad_clusters_truncated"] = n_trunc
        windows = self._windows(core_labels, cells, ctx) if cfg.window_um is not None else {}
        return TileResult(stats=stats, maps={"labels": self._map(labels, ctx)}, cells=cells, windows=windows)

    def _open_positives(self, table: dict[str, np.ndarray], positive: np.ndarray, score: np.ndarray,
                        enclosures: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Which positive calls stay positive: enclosed ones, and open ones that score like them.

        An E-cad+ cell's membrane runs all round it, so its nucleus lies in a closed
        enclosure of the membrane (:func:`membrane_enclosures`, at most
        ``ring_holes.max_area_um2``). A negative cell beside positive ones borrows their
        membranes on the sides it shares with them and is open elsewhere; a gap in a true
        cell's membrane leaves it open too, but its ring still scores like the enclosed
        cells of the tile. A positive call whose centre no closed membrane encloses stays
        positive only if its score reaches ``open_membrane.min_score_fraction`` of the
        median score of the tile's enclosed positive calls (halo included; with fewer than
        ``open_membrane.min_reference_cells`` of them, every call stays). Relative to the
        tile's own cells, because the level of a membrane varies with the lab's DAB.

        Parameters
        ----------
        table : dict of (N,) ndarray
            Nucleus table (``row``, ``col`` px).
        positive : (N,) bool ndarray
            The calls by the absolute threshold.
        score : (N,) float ndarray
            Membrane score of each nucleus, DAB OD.
        enclosures : (labels, area_um2)
            :func:`membrane_enclosures` of the tile.

        Returns
        -------
        keep : (N,) bool ndarray
            False for the positive calls that become negative; True elsewhere.
        """
        oc = self.config.open_membrane
        keep = np.ones(len(positive), bool)
        if not positive.any():
            return keep
        inside = inside_enclosure(enclosures, table["row"], table["col"], self.config.ring_holes.max_area_um2)
        ref = np.asarray(score, np.float64)[positive & inside]
        if len(ref) < oc.min_reference_cells:
            return keep
        keep[positive & ~inside & (np.asarray(score) < oc.min_score_fraction * float(np.median(ref)))] = False
        return keep

    def _late_rules(self, d: dict[str, np.ndarray], labels: np.ndarray, table: dict[str, np.ndarray],
                    classes: np.ndarray, mpp: float) -> np.ndarray:
        """The E-cadherin analyzer's own late-erythroid tests on top of the shared rules.

        A late-erythroid call (``classes.late_erythroid_*``, the H&E rules) stays one only if
        (a) its mean counterstain reaches ``late_erythroid_min_od`` plus
        ``late_erythroid_od_per_um2`` per µm² above ``late_erythroid_min_area_um2`` (the smaller
        the nucleus, the paler it may be: a section through a late normoblast's pole is a
        small, faint cap, while a small lymphocyte's nucleus is as dense but larger), and
        (b) its rim is pale (:func:`rim_density` at most ``late_rim.max_od``, less
        ``late_rim.od_per_um2`` per µm² above ``late_erythroid_min_area_um2``: the larger late
        calls are mostly lymphocytes) and, with ``late_rim.pale_od``, at least
        ``late_rim.pale_share_per_um2`` per µm² above ``late_erythroid_min_area_um2`` of the
        band's pixels are paler than ``pale_od`` (a lymphocyte's scant cytoplasm leaves little
        pale rim, the more so the larger the nucleus): otherwise ``other``. Small caps called late by
        :meth:`_late_caps` (below ``late_erythroid_min_area_um2``) have their own tests and are
        left as they are.
        """
        cfg = self.config
        late = (classes == "late_erythroid") & (
            np.asarray(table["area_um2"], np.float64) >= cfg.classes.late_erythroid_min_area_um2)
        classes = classes.copy()
        slope = cfg.late_erythroid_od_per_um2
        if slope and late.any():
            need = cfg.classes.late_erythroid_min_od + slope * (table["area_um2"] - cfg.classes.late_erythroid_min_area_um2)
            classes[late & (table["h_od_mean"] < need)] = "other"
            late &= classes == "late_erythroid"
        rim_cfg = cfg.late_rim
        if rim_cfg is not None and late.any():
            sub = {"label": table["label"][late]}
            rim, pale = _rim_stats(labels, sub, d["h_od"] + d["dab_od"], mpp, inner_um=rim_cfg.inner_um,
                                   outer_um=rim_cfg.outer_um, quantile=rim_cfg.quantile, pale_od=rim_cfg.pale_od)
            above = np.asarray(table["area_um2"], np.float64)[late] - cfg.classes.late_erythroid_min_area_um2
            max_od = rim_cfg.max_od - rim_cfg.od_per_um2 * above
            classes[np.flatnonzero(late)[rim > max_od]] = "other"  # NaN (no rim: boxed in) stays late
            if rim_cfg.pale_od is not None:
                classes[np.flatnonzero(late)[pale < rim_cfg.pale_share_per_um2 * above]] = "other"  # NaN stays
        return classes

    def _late_caps(self, table: dict[str, np.ndarray], classes: np.ndarray, mpp: float) -> np.ndarray:
        """Late-erythroid calls from a nucleus' nearest neighbour: crowded calls and small caps.

        A late normoblast's pyknotic nucleus sits alone in a cell 7-10 µm across, so the nearest
        other nucleus lies several µm away, while a profile with a nucleus within ~5 µm that is
        paler than a pyknotic nucleus or elongated is mostly a lobe of a myeloid nucleus
        (``late_crowded``: such late calls become ``other``). A section near the pole of the
        round nucleus is a small, even, round disc: ``other`` nuclei below
        ``classes.late_erythroid_min_area_um2`` that are dense enough
        (``classes.late_erythroid_min_od``), even, round and far from other nuclei
        (``late_caps``) become ``late_erythroid``. Runs before :meth:`_late_rules`, whose tests
        leave the caps alone (a cap's rim holds its own blurred edge).

        Parameters
        ----------
        table : dict of (N,) ndarray
            The detected nuclei of the tile, halo included (``row``, ``col`` px; ``area_um2``,
            ``eccentricity``, ``h_od_mean``, ``h_od_cv``). They alone are the neighbours: the
            pale nuclei and membrane-enclosed cells found later do not change the late calls.
        classes : (N,) object ndarray of str
        mpp : float
            µm per pixel.

        Returns
        -------
        classes : (N,) object ndarray of str
            A new array; ``ecad_pos`` and ``megakaryocyte`` are kept.
        """
        cfg = self.config
        caps, crowd = cfg.late_caps, cfg.late_crowded
        n = len(classes)
        if n == 0 or (caps is None and crowd is None):
            return classes
        classes = classes.copy()
        nn = np.full(n, np.inf)
        if n > 1:
            rc = np.column_stack([table["row"], table["col"]]).astype(np.float64)
            dist, _ = cKDTree(rc).query(rc, k=2)
            nn = dist[:, 1] * mpp
        area = np.asarray(table["area_um2"], np.float64)
        ecc = np.asarray(table["eccentricity"], np.float64)
        od = np.asarray(table["h_od_mean"], np.float64)
        other = classes == "other"
        if crowd is not None:
            lobe = (nn < crowd.spacing_um) & ((od < crowd.min_od) | (ecc > crowd.max_eccentricity))
            classes[(classes == "late_erythroid") & lobe] = "other"
        if caps is not None:
            cap = (other & (area >= caps.min_area_um2) & (area < cfg.classes.late_erythroid_min_area_um2)
                   & (nn >= caps.min_spacing_um) & (np.asarray(table["h_od_cv"], np.float64) <= caps.max_od_cv)
                   & (ecc <= caps.max_eccentricity) & (od >= cfg.classes.late_erythroid_min_od))
            classes[cap] = "late_erythroid"
        return classes

    def _late_faint(self, ft: dict[str, np.ndarray]) -> np.ndarray:
        """Class of each pale nucleus of the faint pass: ``late_erythroid`` or ``other``.

        A section near the pole of a late normoblast's round pyknotic nucleus can fall below
        the nuclear mask; it stays a round, solid, even disc, denser than the open chromatin
        of a myeloid nucleus (``late_faint``; null: all ``other``).

        Parameters
        ----------
        ft : dict of (M,) ndarray
            The faint pass' nucleus table (``area_um2`` µm², ``eccentricity``, ``solidity``,
            ``h_od_mean`` OD, ``h_od_cv``).

        Returns
        -------
        classes : (M,) object ndarray of str
        """
        lf = self.config.late_faint
        out = np.full(len(ft["label"]), "other", dtype=object)
        if lf is None:
            return out
        area = np.asarray(ft["area_um2"], np.float64)
        late = ((area >= lf.min_area_um2) & (area <= lf.max_area_um2)
                & (np.asarray(ft["eccentricity"], np.float64) <= lf.max_eccentricity)
                & (np.asarray(ft["solidity"], np.float64) >= lf.min_solidity)
                & (np.asarray(ft["h_od_cv"], np.float64) <= lf.max_od_cv)
                & (np.asarray(ft["h_od_mean"], np.float64) >= lf.min_od))
        out[late] = "late_erythroid"
        return out

    def _add_ring_enclosed(self, d: dict[str, np.ndarray], table: dict[str, np.ndarray], classes: np.ndarray,
                           positive: np.ndarray, ring_od: np.ndarray, nucleus_od: np.ndarray, allowed: np.ndarray,
                           mpp: float, enclosures: tuple[np.ndarray, np.ndarray]
                           ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Append the E-cad+ cells found by their membrane alone (:func:`ring_enclosed_cells`).

        An enclosure must also score positive on its own ring (the membrane all round it),
        so a gap between negative cells closed off by the membranes of positive neighbours
        is not a cell.
        """
        cfg = self.config
        rh = cfg.ring_holes
        hl, ht = ring_enclosed_cells(
            d["dab_od"], d["h_od"], mpp, np.column_stack([table["row"], table["col"]]),
            dab_min_od=rh.dab_min_od, sigma_um=rh.sigma_um, min_area_um2=rh.min_area_um2,
            max_area_um2=rh.max_area_um2, min_h_od=rh.min_h_od, allowed=allowed, enclosures=enclosures)
        h_ring = ring_scores(hl, ht, d["dab_od"], mpp, gap_um=cfg.ring_gap_um, width_um=cfg.ring_width_um,
                             sectors=cfg.ring_sectors)
        ok = h_ring >= cfg.membrane_min_dab_od
        hl = np.where(np.isin(hl, ht["label"][ok]), hl, 0)
        ht = {k: v[ok] for k, v in ht.items()}
        n_new = int(ok.sum())
        table = {k: np.concatenate([np.asarray(table[k]), ht[k].astype(np.asarray(table[k]).dtype)]) for k in table}
        classes = np.concatenate([classes, np.full(n_new, "ecad_pos", dtype=object)])
        positive = np.concatenate([positive, np.ones(n_new, bool)])
        ring_od = np.concatenate([ring_od, h_ring[ok]])
        nucleus_od = np.concatenate([nucleus_od, _region_means(d["dab_od"], hl, ht["label"])])
        return table, classes, positive, ring_od, nucleus_od, hl

    def _add_faint(self, d: dict[str, np.ndarray], nuc_labels: np.ndarray, hole_labels: np.ndarray | None,
                   table: dict[str, np.ndarray], classes: np.ndarray, positive: np.ndarray, ring_od: np.ndarray,
                   nucleus_od: np.ndarray, marrow: np.ndarray, mpp: float,
                   enclosures: tuple[np.ndarray, np.ndarray] | None = None,
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Append the pale nuclei below the nuclear mask (:func:`faint_nuclei`): ``other``, late-erythroid or E-cad+ cells.

        Only in haematopoietic tissue, away from the nuclei and the membrane-enclosed cells
        already found. Late erythroid only by :meth:`_late_faint` (``late_faint``: round,
        solid, even and not too pale). E-cad+ only with ``enclosures``
        (``faint_enclosed_positive``): a pale nucleus inside a closed membrane of at most
        ``ring_holes.max_area_um2`` whose own ring scores ``membrane_min_dab_od`` (an
        enclosure too small for :func:`ring_enclosed_cells`, which takes 20 µm² and up, round
        the cap of an early erythroblast's nucleus). Scoring every pale nucleus on its own
        ring took the E-cad+ count error mean from 0.069 to 0.161 (tuning seeds 0-11,
        2,048 px): most of them are myeloid nuclei beside a positive cell, open on their
        other sides. Calling the round, small, dense-enough ones with a pale rim late
        erythroid took the ratio error max from 0.082 to 0.091-0.099 and the late max from
        0.58 to 0.73-0.79 (seeds 0-23). The membrane ring is measured for all
        (``dab_ring_od`` in cells.csv).
        """
        cfg = self.config
        fc = cfg.faint_nuclei
        taken = nuc_labels != 0
        if hole_labels is not None:
            taken |= hole_labels != 0
        fl, ft = faint_nuclei(d["mask"], d["peak"], d["h_od"], mpp, taken, background_um=fc.background_um,
                              contrast_od=fc.contrast_od, gap_um=fc.gap_um,
                              min_radius_um=fc.min_radius_um, min_distance_um=fc.min_distance_um,
                              min_area_um2=fc.min_area_um2, max_area_um2=fc.max_area_um2, allowed=marrow,
                              max_background_od=fc.max_background_od, max_eccentricity=fc.max_eccentricity)
        n_new = len(ft["label"])
        if n_new == 0:
            return table, classes, positive, ring_od, nucleus_od
        offset = int(nuc_labels.max())
        both = np.where(fl > 0, fl + offset, nuc_labels).astype(np.int32)
        ft = dict(ft, label=ft["label"] + offset)
        f_ring = ring_scores(both, ft, d["dab_od"], mpp, gap_um=cfg.ring_gap_um, width_um=cfg.ring_width_um,
                             sectors=cfg.ring_sectors, min_own_sectors=cfg.ring_min_own_sectors)
        f_class = self._late_faint(ft)
        f_pos = np.zeros(n_new, bool)
        if enclosures is not None:
            f_pos = (f_ring >= cfg.membrane_min_dab_od) & inside_enclosure(
                enclosures, ft["row"], ft["col"], cfg.ring_holes.max_area_um2)
            f_class[f_pos] = "ecad_pos"
        table = {k: np.concatenate([np.asarray(table[k]), ft[k].astype(np.asarray(table[k]).dtype)]) for k in table}
        classes = np.concatenate([classes, f_class])
        positive = np.concatenate([positive, f_pos])
        ring_od = np.concatenate([ring_od, f_ring])
        nucleus_od = np.concatenate([nucleus_od, _region_means(d["dab_od"], both, ft["label"])])
        return table, classes, positive, ring_od, nucleus_od

    def _clusters(self, table: dict[str, np.ndarray], positive: np.ndarray, ctx: TileContext,
                  shape: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        """Clusters owned by this tile (lowest member in the core), how many touch a cut edge, and
        which rows of ``table`` belong to any counted cluster (owned here or not)."""
        cfg = self.config.clusters
        mpp = float(ctx.mpp)
        if cfg.neighbourhood_um is not None:
            positive = sheet_members(np.column_stack([table["row"], table["col"]]) * mpp, positive,
                                     radius_um=cfg.neighbourhood_um, min_fraction=cfg.min_positive_fraction)
        idx = np.flatnonzero(positive)
        rows, cols = table["row"][idx], table["col"][idx]
        clusters = count_clusters(np.column_stack([rows, cols]) * mpp, link_um=cfg.link_um,
                                  min_extent_um=cfg.min_extent_um)
        member = np.zeros(len(table["row"]), bool)
        if not clusters:
            return 0, 0, member
        member[idx[np.concatenate(clusters)]] = True
        edge_px = cfg.link_um / mpp
        # edges where the tile cuts the slide (a cluster there may continue beyond the tile)
        cut_top, cut_left = ctx.origin_px[0] > 0, ctx.origin_px[1] > 0
        cut_bottom = ctx.core[0].stop < min(shape[0], ctx.valid_px[0])
        cut_right = ctx.core[1].stop < min(shape[1], ctx.valid_px[1])
        n = n_trunc = 0
        for m in clusters:
            if not ctx.in_core(rows[m[:1]], cols[m[:1]])[0]:
                continue
            n += 1
            r, c = rows[m], cols[m]
            if ((cut_top and r.min() < edge_px) or (cut_left and c.min() < edge_px)
                    or (cut_bottom and r.max() > shape[0] - edge_px) or (cut_right and c.max() > shape[1] - edge_px)):
                n_trunc += 1
        return n, n_trunc, member

    def _windows(self, core_labels: np.ndarray, cells: dict[str, np.ndarray], ctx: TileContext) -> dict:
        cls = cells["class"]
        out: dict[tuple[int, int], dict[str, float]] = {}
        for key, n, inwin in self._window_blocks(core_labels, cells, ctx):
            out[key] = {
                "haematopoietic_px": int(n[tis.HAEMATOPOIETIC]),
                "n_nucleated": int(inwin.sum()),
                "n_ecad_pos": int((inwin & (cls == "ecad_pos")).sum()),
                "n_late_erythroid": int((inwin & (cls == "late_erythroid")).sum()),
            }
        return out

    # -- slide ----------------------------------------------------------------------------
    def finalize(
        self,
        totals: dict[str, float],
        windows: dict[tuple[int, int], dict[str, float]],
        *,
        age: float | None = None,
    ) -> dict[str, Any]:
        cfg = self.config
        px_um2 = float(cfg.mpp) ** 2
        g = lambda key: float(totals.get(key, 0))  # noqa: E731
        haem_um2 = g("haematopoietic_px") * px_um2
        n_cells = int(g("n_nucleated"))
        n_pos = int(g("n_ecad_pos"))
        n_late = int(g("n_late_erythroid"))
        n_ery = n_pos + n_late

        def ratio(a: float, b: float, scale: float = 1.0) -> float | None:
            return None if b <= 0 else float(a / b * scale)

        ci = wilson_interval(n_pos, n_ery)
        per100 = ratio(n_pos, n_cells, 100.0)
        lsr = ratio(n_pos, n_ery)
        n_clusters = int(g("n_ecad_clusters"))
        readouts: dict[str, Any] = {
            "nucleated_cells": n_cells,
            "ecad_pos_cells": n_pos,
            "ecad_pos_per_100_nucleated": per100,
            "ecad_pos_per_mm2": ratio(n_pos, haem_um2, 1e6),
            "late_erythroid_cells": n_late,
            "left_shift_ratio": lsr,
            "left_shift_ratio_ci95": None if ci is None else [ci[0], ci[1]],
            "ecad_pos_clusters": n_clusters,
            "megakaryocytes_per_mm2": ratio(g("n_megakaryocyte"), haem_um2, 1e6),
            "nucleated_cells_per_mm2": ratio(n_cells, haem_um2, 1e6),
        }
        ref = self.reference
        icfg = cfg.interpretation
        if lsr is None or n_ery < icfg.min_erythroid_cells:
            shift = "insufficient erythroid cells"
        elif lsr > icfg.left_shift_ratio_high:
            shift = "left-shifted erythropoiesis"
        else:
            shift = "no left shift"
        r100 = ref.ecad_pos_per_100_nucleated
        interpretation = {
            "ecad_pos_per_100_nucleated": {
                "value": per100, "low": r100.low, "high": r100.high, "unit": r100.unit,
                "verdict": _range_verdict(per100, r100.low, r100.high), "source": r100.source,
            },
            "left_shift": {
                "value": lsr, "threshold": icfg.left_shift_ratio_high, "min_erythroid_cells": icfg.min_erythroid_cells,
                "erythroid_cells": n_ery, "verdict": shift, "source": ref.left_shift_ratio.source,
                # the ratio is the early share of the erythroid precursors: its normal range for
                # orientation (no cut-off of the ratio itself is published; the verdict is the setting above)
                "orientation": fraction_range(ref.early_erythroid_pct_of_erythroid),
            },
            "clusters": {
                "value": n_clusters, "alert_count": icfg.cluster_alert_count,
                "flag": n_clusters >= icfg.cluster_alert_count,
                "truncated": int(g("n_ecad_clusters_truncated")),
                "note": _cluster_note(cfg),
                "source": ref.ecad_pos_clusters.source,
            },
        }
        win = [v for v in windows.values() if v.get("n_nucleated", 0) > 0]
        out = {
            "readouts": readouts,
            "areas_um2": {
                "haematopoietic": haem_um2,
                "fat": g("fat_px") * px_um2,
                "bone": g("bone_px") * px_um2,
                "excluded": g("excluded_px") * px_um2,
            },
            "counts": {name: int(g(f"n_{name}")) for name in CELL_CLASSES}
            | {"ecad_clusters_truncated": int(g("n_ecad_clusters_truncated")),
               # positive calls that the closed-membrane rules turned negative / pale nuclei they made E-cad+
               "ecad_open_turned_negative": int(g("n_ecad_open_turned_negative")),
               "ecad_pos_pale_enclosed": int(g("n_ecad_pos_pale_enclosed"))},
            "interpretation": interpretation,
            "stain_vectors_source": self.vectors_source,
            "positivity_compartment": cfg.positivity_compartment,
            "measurements": {"n_windows_with_cells": len(win),
                             "nuclear_scale": nuclear_scale(totals, cfg.nuclear_area_check_um2)},
        }
        if cfg.tissue.classes.crush is not None:
            out["measurements"]["crush"] = crush_measurement(totals, px_um2, haem_um2 + g("fat_px") * px_um2)
        for v in readouts.values():
            if isinstance(v, float) and not math.isfinite(v):
                raise AssertionError("non-finite readout")  # ratios guard their denominators
        return out
