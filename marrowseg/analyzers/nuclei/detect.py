"""The classical nuclear detector: mask, seeds, watershed and the optional clean-up steps in order."""

from __future__ import annotations

from typing import Any

import numpy as np

from marrowseg.analyzers.distance import distance_to_background
from marrowseg.analyzers.nuclei.lobes import drop_thin, group_lobes, merge_megakaryocytes
from marrowseg.analyzers.nuclei.maps import _check_image, _smooth, nuclear_mask
from marrowseg.analyzers.nuclei.seeds import (
    core_centroids,
    local_peaks,
    nuclei_from_centres,
    unseeded_components,
)
from marrowseg.analyzers.nuclei.split import split_by_area, split_by_shape
from marrowseg.analyzers.nuclei.table import empty_table

__all__ = ["detect_nuclei"]


def detect_nuclei(
    h_od: np.ndarray,
    mpp: float,
    cfg: Any,
    *,
    peak_map: np.ndarray | None = None,
    mask_map: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    background_map: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Detect and segment nuclei in a haematoxylin OD image (classical detector).

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin optical density (or concentration), 0 where unstained.
    mpp : float
        Pixel size, µm per pixel (> 0).
    cfg : NucleiConfig
        ``peak_sigma_um``, ``min_distance_um``, ``min_peak_od``, ``mask_sigma_um``,
        ``mask_od``, ``min_area_um2``; ``seed_unseeded`` (a seed for every component of the
        thresholded mask of a nucleus's size that has none: :func:`unseeded_components`; never
        on a given ``mask``); ``mask_contrast_od`` (null: no contrast test),
        ``mask_background_sigma_um`` and ``mask_fill_holes_um2`` for :func:`nuclear_mask`; ``split_max_solidity`` (null: no split),
        ``split_min_area_um2``, ``split_h_um`` for :func:`split_by_shape`;
        ``megakaryocyte_min_radius_um`` (null: no merge), ``megakaryocyte_core_radius_um``,
        ``megakaryocyte_core_min_area_um2`` for :func:`merge_megakaryocytes`;
        ``centre_core_fraction`` (null: the whole region's centroid) for :func:`core_centroids`
        (weighted: the centre of mass of the excess over that fraction of the maximum);
        ``clump_nucleus_area_um2`` (absent or null: no area split) and ``clump_max_solidity``
        for :func:`split_by_area` (with ``split_max_area_um2`` as its upper limit);
        ``lobe_max_gap_um`` (null: regions below ``min_area_um2`` dropped) and
        ``lobe_max_extent_um`` for :func:`group_lobes`; ``min_width_um`` (null: no width test)
        for :func:`drop_thin`.
    peak_map, mask_map : (H, W) float32 ndarray, optional
        ``h_od`` smoothed with ``peak_sigma_um`` / ``mask_sigma_um`` (the torch module
        computes them on the device); computed here with scipy when omitted.
    allowed : (H, W) bool ndarray, optional
        Centres outside it are ignored (e.g. only haematopoietic tissue).
    background_map : (H, W) float32 ndarray, optional
        ``h_od`` smoothed with ``mask_background_sigma_um`` on the full grid (used only with
        ``mask_contrast_od``; see :func:`nuclear_mask`); computed here with scipy when omitted.
    mask : (H, W) bool ndarray, optional
        Nuclear pixels from elsewhere (the learned mask net, ``he.nuclei.mask_net``) in place
        of :func:`nuclear_mask`'s thresholds (the megakaryocyte merge still looks at theirs).

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background, 1..N nuclei (label ``table["label"][i]`` is row i).
    table : dict of str to (N,) ndarray
        Columns :data:`NUCLEUS_COLUMNS`; ``row``/``col`` are the region's (or its dense core's)
        centroid in pixels, ``area_um2`` in µm², ``h_od_mean``/``h_od_cv`` of ``h_od`` in the region.
    """
    h_od = _check_image(h_od)
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    peak = _smooth(h_od, cfg.peak_sigma_um, mpp) if peak_map is None else _check_image(peak_map, "peak_map")
    maskm = _smooth(h_od, cfg.mask_sigma_um, mpp) if mask_map is None else _check_image(mask_map, "mask_map")
    if peak.shape != h_od.shape or maskm.shape != h_od.shape:
        raise ValueError(f"peak/mask maps {peak.shape}/{maskm.shape} differ from h_od {h_od.shape}")
    learned = mask is not None
    if not learned:
        mask, filled = nuclear_mask(h_od, mpp, cfg, maskm, background_map)
    else:
        mask = np.asarray(mask, bool)
        if mask.shape != h_od.shape:
            raise ValueError(f"mask {mask.shape} differs from h_od {h_od.shape}")
        # a megakaryocyte is still found as one dense mass of the thresholded, hole-filled mask
        # (a learned mask cuts it into lobes: phantom megakaryocytes 3 -> 0 of 3 on that mask)
        _, filled = nuclear_mask(h_od, mpp, cfg, maskm, background_map)
    min_dist_px = max(1, int(round(float(cfg.min_distance_um) / mpp)))
    search = mask if allowed is None else (mask & allowed)
    if not search.any():
        return np.zeros(h_od.shape, np.int32), empty_table()
    relief = peak
    threshold = float(cfg.min_peak_od)
    seedable = search
    if getattr(cfg, "seeds", "peaks") == "distance":
        # touching and overlapping nuclei: one seed per maximum of the distance to the
        # nuclear boundary (µm), tie-broken by the smoothed haematoxylin; the haematoxylin
        # threshold still applies to every seed
        dist_um = distance_to_background(mask) * np.float32(mpp)
        relief = dist_um + np.float32(cfg.distance_od_weight_um) * peak
        # no early exit without seeds: lobes too small to hold one are still grouped below
        search = search & (peak >= threshold) & (dist_um >= np.float32(cfg.min_radius_um))
        threshold = float(cfg.min_radius_um)
    centres = local_peaks(relief, min_dist_px, threshold, search)
    # the rule was chosen for the thresholded mask, whose components are all dense enough to be
    # nuclei; a learned mask also marks pale ones, and seeding them took mbm-dev from 3,904 to
    # 4,355 calls for 3,805 cells (MAE 8.3 -> 19.6)
    if getattr(cfg, "seed_unseeded", False) and not learned:
        extra = unseeded_components(mask, seedable, relief, centres, float(cfg.min_area_um2) / float(mpp) ** 2)
        centres = np.concatenate([centres, extra]) if len(extra) else centres
    lobe_gap_um = getattr(cfg, "lobe_max_gap_um", None)
    # with lobe grouping the regions below min_area_um2 are kept until the lobes among them
    # are grouped (after the split and the merge, which never act on regions that small)
    min_area_um2 = float(cfg.min_area_um2) if lobe_gap_um is None else 0.0
    labels, table = nuclei_from_centres(h_od, mpp, centres, relief, mask, min_area_um2=min_area_um2)
    max_solidity = getattr(cfg, "split_max_solidity", None)
    if max_solidity is not None and len(table["label"]):
        labels, table = split_by_shape(
            h_od, mpp, labels, table,
            min_area_um2=float(cfg.split_min_area_um2),
            max_solidity=float(max_solidity),
            h_um=float(cfg.split_h_um),
            keep_area_um2=float(cfg.min_area_um2),
            max_area_um2=getattr(cfg, "split_max_area_um2", None),
        )
    mk_radius_um = getattr(cfg, "megakaryocyte_min_radius_um", None)
    if mk_radius_um is not None and len(table["label"]):
        labels, table = merge_megakaryocytes(
            h_od, mpp, filled, labels, table,
            min_radius_um=float(mk_radius_um),
            core_radius_um=float(cfg.megakaryocyte_core_radius_um),
            min_area_um2=float(cfg.megakaryocyte_core_min_area_um2),
            max_od_cv=getattr(cfg, "megakaryocyte_merge_max_od_cv", None),
        )
    clump_area_um2 = getattr(cfg, "clump_nucleus_area_um2", None)
    if clump_area_um2 is not None and len(table["label"]):
        labels, table = split_by_area(
            h_od, mpp, labels, table,
            nucleus_area_um2=float(clump_area_um2),
            max_solidity=getattr(cfg, "clump_max_solidity", None),
            max_area_um2=getattr(cfg, "split_max_area_um2", None),
        )
    first_grouped = None  # label ids from here on are groups of lobes
    if lobe_gap_um is not None:
        first_grouped = int(labels.max()) + 1
        labels, table = group_lobes(
            h_od, mpp, mask, labels, table,
            min_area_um2=float(cfg.min_area_um2),
            max_gap_um=float(lobe_gap_um),
            max_extent_um=float(cfg.lobe_max_extent_um),
            allowed=allowed,
        )

    def grouped() -> np.ndarray | None:
        return None if first_grouped is None else table["label"] >= first_grouped

    min_width_um = getattr(cfg, "min_width_um", None)
    if min_width_um is not None and len(table["label"]):
        # a group of lobes is not one ellipse: its width says nothing
        labels, table = drop_thin(labels, table, float(min_width_um), exempt=grouped())
    core_fraction = getattr(cfg, "centre_core_fraction", None)
    if core_fraction is not None and len(table["label"]):
        # a group of lobes keeps the centroid of all its lobes (its densest lobe is off centre)
        # weighted by the excess over the core threshold (see core_centroids): chosen over the
        # plain core centroid in every mbm-dev leave-one-patient-out fold
        table = core_centroids(labels, table, maskm, float(core_fraction), exempt=grouped(), weighted=True)
    return labels, table
