"""Settings of nuclear detection and morphology classes (shared by H&E and E-cadherin).

Values live in YAML (``configs/he.yaml``, ``configs/ecad.yaml``); these models only
validate. Lengths are µm, areas µm², densities haematoxylin optical density (OD).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from marrowseg.config._base import Strict

__all__ = ["NucleiConfig", "NucleusClassesConfig", "FaintNucleiConfig"]


class NucleiConfig(Strict):
    """Detection of nuclei on a haematoxylin OD image (see :mod:`marrowseg.analyzers.nuclei`)."""

    detector: Literal["classical", "unet"] = Field(
        description="classical: smoothed-haematoxylin peaks + watershed; unet: peaks of a learned "
        "centre map (nuclei_model.CentreNet, H&E only, he.mpp 0.5), grown into nuclei by the same watershed"
    )
    peak_sigma_um: float = Field(gt=0, description="Gaussian sigma of the peak-finding map, µm")
    min_distance_um: float = Field(gt=0, description="minimum distance between two nucleus centres, µm")
    min_peak_od: float = Field(ge=0, description="smoothed haematoxylin OD a centre must reach")
    mask_sigma_um: float = Field(ge=0, description="Gaussian sigma of the map thresholded into nuclear pixels, µm")
    mask_od: float = Field(ge=0, description="haematoxylin OD above which a pixel is nuclear")
    min_area_um2: float = Field(ge=0, description="smaller segmented nuclei are dropped, µm²")
    # optional (defaults keep the original peak detector, which ecad.yaml relies on)
    seeds: Literal["peaks", "distance"] = Field(
        "peaks",
        description="peaks: maxima of the smoothed haematoxylin; distance: maxima of the distance to "
        "the nuclear-mask boundary (splits touching nuclei), plus distance_od_weight_um x smoothed OD",
    )
    distance_od_weight_um: float = Field(0.3, ge=0, description="µm of distance one OD of smoothed haematoxylin is worth (seeds: distance)")
    min_radius_um: float = Field(1.0, ge=0, description="a distance seed lies at least this far inside the nuclear mask, µm (seeds: distance)")
    seed_unseeded: bool = Field(
        False, description="a nuclear-mask component at least min_area_um2 large that holds no seed gets one at "
        "its highest relief (a small or thin nucleus below the seeds' OD or depth rules), within allowed")
    # optional: null keeps the absolute threshold alone (the original mask, which ecad.yaml relies on)
    mask_contrast_od: float | None = Field(
        None, ge=0,
        description="a nuclear pixel also exceeds its surroundings (h_od smoothed with mask_background_sigma_um) "
        "by this much, OD (null: mask_od alone)")
    mask_background_sigma_um: float = Field(8.0, gt=0, description="Gaussian sigma of the local haematoxylin "
                                            "background, µm: a few cell spacings (mask_contrast_od)")
    mask_fill_holes_um2: float | None = Field(
        None, gt=0, description="holes in the nuclear mask up to this area are nuclear (the pale nucleoplasm of an "
        "open-chromatin nucleus), µm² (null: no filling)")
    centre_core_fraction: float | None = Field(
        None, gt=0, le=1, description="a nucleus's reported centre is the centre of mass of its smoothed haematoxylin "
        "above this fraction of the region's maximum, each pixel weighted by its excess over that level "
        "(nuclei.core_centroids, weighted; null: the whole region's centroid)")
    search_margin_um: float | None = Field(
        None, ge=0, description="nuclei are searched over the tile core grown by this margin only, µm; it must "
        "hold the largest nucleus touching the core (megakaryocytes reach ~25 µm beyond it). null: the whole "
        "tile with its halo")
    # optional: null keeps every segmented nucleus whole
    split_max_solidity: float | None = Field(
        None, gt=0, le=1,
        description="a nucleus at least split_min_area_um2 large and at most this solid (pixels / convex hull) "
        "is cut at its waists into the overlapping nuclei it is made of (null: never split)",
    )
    split_min_area_um2: float = Field(40.0, ge=0, description="smaller nuclei are never split, µm² (split_max_solidity)")
    split_max_area_um2: float | None = Field(None, gt=0, description="larger nuclei are never split, µm² "
                                             "(a lobulated megakaryocyte nucleus is one cell; null: no limit)")
    split_h_um: float = Field(0.5, gt=0, description="depth of a waist: how far the distance to the edge must rise "
                              "from the neck into each part, µm (split_max_solidity)")
    # optional: null drops every region below min_area_um2 (the original detector, which ecad.yaml relies on)
    lobe_max_gap_um: float | None = Field(
        None, gt=0, description="regions below min_area_um2 at most this far apart are the lobes of one segmented "
        "nucleus and are counted as one cell when there are >= 2 of them (nuclei.group_lobes), µm (null: dropped)")
    lobe_max_extent_um: float = Field(10.0, gt=0, description="a group of lobes is one nucleus only up to this "
                                      "row or column extent, µm (lobe_max_gap_um)")
    min_width_um: float | None = Field(
        None, gt=0, description="segmented nuclei narrower than this (minor axis of the ellipse with their area and "
        "eccentricity) are dropped, µm: strips of dark stroma (null: no width test)")
    # optional: null keeps every region whole whatever its area (the original detector)
    clump_nucleus_area_um2: float | None = Field(
        None, gt=0, description="a region round(area / this) >= 2 nuclei large is a clump of overlapping nuclei and is "
        "cut into that many parts by k-means (nuclei.split_by_area), µm² (null: never; at most split_max_area_um2)")
    clump_max_solidity: float | None = Field(
        None, gt=0, le=1, description="only regions at most this solid are cut by the area split (null: any)")
    # optional: null keeps every fragment of a large nucleus (the original detector)
    megakaryocyte_min_radius_um: float | None = Field(
        None, gt=0,
        description="a megakaryocyte nucleus holds a disk of this radius inside the nuclear mask, µm; the "
        "detected nuclei centred in such a nucleus's core are merged into one (nuclei.merge_megakaryocytes; "
        "null: never merge)",
    )
    megakaryocyte_core_radius_um: float = Field(4.0, gt=0, description="radius of the disk that opens the nuclear "
                                                "mask to find megakaryocyte cores, µm: narrower necks are cut")
    megakaryocyte_core_min_area_um2: float = Field(250.0, gt=0, description="smallest megakaryocyte core (the "
                                                   "opened mask), µm²")
    megakaryocyte_merge_max_od_cv: float | None = Field(
        None, ge=0, description="a merged region with a higher std/mean of haematoxylin is a clump, not one "
        "nucleus: its nuclei stay apart (null: no check)")
    # optional: a learned nuclear mask in place of the thresholded one (classical detector)
    mask_net: bool = Field(False, description="nuclear mask from the learned mask net (weights/nuclear_mask_monuseg.pt, "
                           "trained on MoNuSeg by scripts/train_nuclear_mask.py) instead of the haematoxylin thresholds")
    mask_net_weights: str | None = Field(None, description="state dict of the mask net (null: the packaged weights)")
    mask_net_threshold: float = Field(0.5, gt=0, lt=1, description="a pixel is nuclear where the mask net's "
                                      "probability reaches this value")
    # optional, detector: unet only
    unet_weights: str | None = Field(None, description="state dict of the centre net (null: the packaged weights/nuclei_unet.pt)")
    unet_min_score: float = Field(0.5, ge=0, le=1, description="a learned centre-map peak must reach this value (detector: unet)")
    unet_min_distance_um: float = Field(2.5, gt=0, description="minimum distance between two learned centres, µm (detector: unet)")


class NucleusClassesConfig(Strict):
    """Morphological classes of nuclei (see :func:`marrowseg.analyzers.nuclei.classify_nuclei`).

    ``megakaryocyte`` is tested first, then ``late_erythroid``; the rest is ``other``.
    """

    megakaryocyte_min_area_um2: float = Field(gt=0, description="nuclear area of a megakaryocyte, µm²")
    late_erythroid_min_area_um2: float = Field(ge=0, description="µm²")
    late_erythroid_max_area_um2: float = Field(gt=0, description="small nucleus of polychromatic/orthochromatic normoblasts, µm²")
    late_erythroid_min_od: float = Field(ge=0, description="mean haematoxylin OD of a dense, pyknotic nucleus")
    late_erythroid_max_eccentricity: float = Field(ge=0, le=1, description="round nucleus")
    late_erythroid_max_od_cv: float = Field(ge=0, description="homogeneous chromatin: std/mean of OD in the nucleus")
    # optional (null keeps the size-only rule that ecad.yaml relies on)
    megakaryocyte_max_od_cv: float | None = Field(
        None, ge=0, description="a megakaryocyte nucleus is one even mass; a clump of several nuclei with "
        "gaps between them has a higher std/mean of OD (null: size alone)"
    )


class FaintNucleiConfig(Strict):
    """Pale nuclei below the nuclear mask, found by local contrast (:func:`marrowseg.analyzers.nuclei.faint_nuclei`)."""

    background_um: float = Field(gt=0, description="half-side of the square whose grey-level opening is the local "
                                 "background (white top-hat); the square must not fit in the nuclei it should find, µm")
    contrast_od: float = Field(gt=0, description="a faint nuclear pixel's mask map exceeds that background by at "
                               "least this, haematoxylin OD")
    gap_um: float = Field(ge=0, description="margin round the nuclei already found where no faint pixel lies, µm")
    min_radius_um: float = Field(gt=0, description="a seed lies at least this far inside the faint mask, µm: thin "
                                 "crescents and lines (a nucleus' blurred edge, a fat-cell membrane) have none")
    min_distance_um: float = Field(gt=0, description="minimum distance between two seeds, µm")
    min_area_um2: float = Field(ge=0, description="smaller faint regions are dropped, µm²")
    max_area_um2: float = Field(gt=0, description="larger faint regions are dropped, µm²")
    max_background_od: float | None = Field(
        None, ge=0, description="a seed's local background (the opening) is at most this, haematoxylin OD: a pale "
        "nucleus lies in pale cytoplasm (null: no limit)")
    max_eccentricity: float | None = Field(
        None, ge=0, le=1, description="more eccentric faint regions are dropped: elongated pale strands between "
        "cells (null: no limit)")
