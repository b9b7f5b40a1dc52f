"""Settings of the E-cadherin analyzer (values live in ``configs/ecad.yaml``).

Reference values for the interpretation live in ``configs/ecad_reference.yaml``
(:func:`load_ecad_reference`). Lengths are µm, densities optical density (OD).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from marrowseg.config._base import Strict
from marrowseg.config.nuclei import FaintNucleiConfig, NucleiConfig, NucleusClassesConfig
from marrowseg.config.tissue_classes import TissueClassesConfig

__all__ = [
    "ECadConfig",
    "ECadStainConfig",
    "ECadTissueConfig",
    "ECadClustersConfig",
    "ECadInterpretationConfig",
    "ReferenceRange",
    "ECadReference",
    "load_ecad_reference",
]


class ECadStainConfig(Strict):
    """Haematoxylin/DAB vectors: estimated per slide in ``prepare``, or the standard ones.

    The estimate (Macenko) is used only when every check passes; otherwise the standard
    Ruifrok H-DAB vectors are used and the reason is recorded in the provenance.
    """

    vectors: Literal["estimate", "standard"] = Field(
        description="estimate: Macenko per slide with checks and fallback; standard: Ruifrok H-DAB always"
    )
    min_od: float = Field(ge=0, description="summed RGB OD of a pixel used by the estimate")
    percentile: float = Field(gt=0, lt=50, description="robust angle extreme of the Macenko estimate, percent")
    min_pixels: int = Field(ge=1, description="fewer stained pixels than this: fall back")
    dab_pixel_od: float = Field(gt=0, description="standard-vector DAB OD that makes a pixel count as DAB-stained")
    min_dab_pixels: int = Field(ge=1, description="fewer DAB-stained pixels than this: fall back (nothing to estimate DAB from)")
    min_spread_deg: float = Field(ge=0, le=90, description="smaller angle between the two estimated vectors: fall back")
    max_spread_deg: float = Field(gt=0, le=90, description="larger angle between the two estimated vectors: fall back")
    max_angle_deg: float = Field(gt=0, le=90, description="an estimated vector farther than this from its standard hue: fall back")
    h_reference_od: float | None = Field(gt=0, description="nuclear counterstain level (median over nucleus-like blobs of their level_percentile) the slide is scaled to, OD (null: no scaling)")
    level_percentile: float = Field(gt=50, lt=100, description="percentile of the haematoxylin density taken in each nucleus-like blob, %")
    level_background_um: float = Field(gt=0, description="radius of the disk whose opening is the counterstain around the nuclei; wider than a nucleus, µm")
    level_min_contrast: float = Field(gt=0, lt=1, description="a blob stands this fraction of the nuclear level above the surrounding counterstain")
    level_min_contrast_od: float = Field(gt=0, description="and at least this much, OD")
    level_max_steps: int = Field(ge=1, description="fixed-point steps of the level at most (it stops when a step moves it by 1 % or less)")
    level_blob_area_um2: tuple[float, float] = Field(description="area of a nucleus-like blob, µm² (low, high)")
    level_min_solidity: float = Field(ge=0, le=1, description="least solidity of a nucleus-like blob")
    level_max_length_um: float = Field(gt=0, description="longest major axis of a nucleus-like blob, µm (ink strokes and fibres are longer)")
    level_min_blobs: int = Field(ge=1, description="fewer blobs than this in the sample patches: no scaling, and the reason is recorded")
    h_scale_min: float = Field(gt=0, description="smallest accepted haematoxylin scale factor (clipped)")
    h_scale_max: float = Field(gt=0, description="largest accepted haematoxylin scale factor (clipped)")
    dab_reference_od: float | None = Field(
        None, gt=0, description="membrane DAB level (median over closed rings round nuclei of their mean DAB) "
        "the slide is scaled to, OD (null: DAB not scaled; membrane compartment only)")
    dab_level_cut_fraction: float = Field(0.7, gt=0, lt=1, description="a membrane ring closes where its "
                                          "smoothed DAB stays above this fraction of the membrane level")
    dab_level_band_um: float = Field(1.0, gt=0, description="width of the band outside a closed ring's "
                                     "enclosure whose mean DAB is the ring's density, µm")
    dab_level_ring_contrast: float = Field(2.0, ge=1, description="a ring counts when its band's mean DAB is "
                                           "at least this many times the mean DAB of what it encloses and the "
                                           "median DAB of the stained tissue (its haze)")
    dab_level_min_rings: int = Field(20, ge=1, description="fewer closed rings than this in the sample "
                                     "patches: DAB not scaled, and the reason is recorded")
    dab_scale_min: float = Field(0.5, gt=0, description="smallest accepted DAB scale factor (clipped)")
    dab_scale_max: float = Field(2.5, gt=0, description="largest accepted DAB scale factor (clipped)")


class ECadTissueConfig(Strict):
    """How the haematoxylin counterstain feeds the tissue classes (no eosin in IHC).

    Bone matrix takes a faint, even counterstain and holds no nuclei; haematopoietic tissue
    is dense with nuclei. The counterstain is split by a grey-level opening wider than a
    nucleus into a smooth *matrix* part (the opening) and a *nuclear* part (the top-hat);
    they stand in for eosin and haematoxylin of the H&E rule
    (``bone_min_eosin_od`` applies to the matrix part, ``bone_max_haem_od`` to the nuclear part).
    """

    opening_um: float = Field(gt=0, description="side of the square opening window; wider than the largest nucleus, µm")
    classes: TissueClassesConfig


class ECadClustersConfig(Strict):
    """Sheets of E-cadherin-positive cells (single linkage of positive cell centres)."""

    link_um: float = Field(gt=0, description="two positive cells closer than this are linked, µm (centre to centre)")
    min_extent_um: float = Field(gt=0, description="a cluster is counted when its extent (largest centre distance) exceeds this, µm")
    neighbourhood_um: float | None = Field(
        None, gt=0, description="a positive cell joins a cluster only when positive cells are at least "
        "min_positive_fraction of the nucleated cells within this distance of its centre, µm (null: every "
        "positive cell joins)")
    min_positive_fraction: float = Field(0.5, gt=0, le=1, description="see neighbourhood_um")


class ECadInterpretationConfig(Strict):
    """Thresholds of the interpretation that the literature does not fix (see ecad_reference.yaml)."""

    left_shift_ratio_high: float = Field(gt=0, lt=1, description="left_shift_ratio above this reads 'left-shifted erythropoiesis'")
    min_erythroid_cells: int = Field(ge=0, description="fewer E-cad+ plus late erythroid cells: no verdict on the ratio")
    cluster_alert_count: int = Field(ge=1, description="this many E-cad+ clusters or more raise a 'clusters present' flag")


class ECadRingHolesConfig(Strict):
    """E-cad+ cells found by a closed membrane holding no detected nucleus (``ecad.ring_enclosed_cells``)."""

    dab_min_od: float = Field(gt=0, description="DAB OD of a membrane pixel, after the smoothing below")
    sigma_um: float = Field(ge=0, description="Gaussian sigma of the DAB smoothing, µm (0: none)")
    min_area_um2: float = Field(ge=0, description="smallest enclosure that is a cell, µm²")
    max_area_um2: float = Field(gt=0, description="largest enclosure that is a cell, µm²")
    min_h_od: float = Field(ge=0, description="mean counterstain OD inside an enclosure: a nucleus is in the section")


class ECadOpenMembraneConfig(Strict):
    """Positive calls whose centre no closed membrane encloses (``ECadAnalyzer._open_positives``)."""

    min_score_fraction: float = Field(
        gt=0, le=1, description="such a call stays E-cad+ only if its membrane score reaches this fraction of the "
        "median score of the tile's enclosed positive calls")
    min_reference_cells: int = Field(
        ge=1, description="fewer enclosed positive calls in the tile (halo included): no reference, the "
        "absolute membrane_min_dab_od alone decides")


class ECadLateRimConfig(Strict):
    """The pale cytoplasm round a late normoblast's nucleus (``ecad.rim_density``)."""

    inner_um: float = Field(ge=0, description="the band starts this far outside the nucleus, µm")
    outer_um: float = Field(gt=0, description="and ends this far outside it, µm")
    quantile: float = Field(gt=0, lt=1, description="quantile of H + DAB OD over the band")
    max_od: float = Field(gt=0, description="late-erythroid calls with a denser rim are 'other' (lymphocytes)")
    od_per_um2: float = Field(
        0.0, ge=0, description="max_od falls by this much per µm² of nuclear area above "
        "classes.late_erythroid_min_area_um2, OD/µm² (0: one max_od for all sizes)")
    pale_od: float | None = Field(
        None, gt=0, description="band pixels below this H + DAB OD are pale cytoplasm (null: no pale-share test)")
    pale_share_per_um2: float = Field(
        0.0, ge=0, description="a late-erythroid call needs at least this share of pale band pixels per µm² of "
        "nuclear area above classes.late_erythroid_min_area_um2, 1/µm²")


class ECadLateCapsConfig(Strict):
    """Small dense nuclear caps called late erythroid (``ECadAnalyzer._late_caps``).

    A section through a late normoblast's round nucleus near its pole is a small, even, round
    disc below ``classes.late_erythroid_min_area_um2``; small pieces of a myeloid nucleus are
    lobes of a cell whose other lobes lie close by.
    """

    min_area_um2: float = Field(gt=0, description="smallest cap, µm² (up to classes.late_erythroid_min_area_um2)")
    min_spacing_um: float = Field(gt=0, description="the nearest other nucleus lies at least this far, µm (centre to centre)")
    max_od_cv: float = Field(gt=0, description="largest coefficient of variation of the counterstain OD over the cap")
    max_eccentricity: float = Field(gt=0, le=1, description="most elongated cap")


class ECadLateFaintConfig(Strict):
    """Pale nuclei of the faint pass called late erythroid (``ECadAnalyzer._late_faint``).

    A section near the pole of a late normoblast's round nucleus can fall below the nuclear
    mask; it is still a round, solid, even disc, denser than the open chromatin of a myeloid
    nucleus.
    """

    min_area_um2: float = Field(gt=0, description="smallest pale nucleus called late, µm²")
    max_area_um2: float = Field(gt=0, description="largest pale nucleus called late, µm²")
    max_eccentricity: float = Field(gt=0, le=1, description="most elongated")
    min_solidity: float = Field(gt=0, le=1, description="least solid (lobes and notches are myeloid)")
    max_od_cv: float = Field(gt=0, description="largest coefficient of variation of the counterstain OD")
    min_od: float = Field(gt=0, description="least mean counterstain OD (scaled)")


class ECadLateCrowdedConfig(Strict):
    """Late-erythroid calls with a close neighbour (``ECadAnalyzer._late_caps``): lobes of a myeloid nucleus."""

    spacing_um: float = Field(gt=0, description="a nucleus whose nearest other nucleus is closer than this (centre to "
                              "centre) is crowded, µm")
    min_od: float = Field(gt=0, description="a crowded late call needs at least this mean counterstain OD (scaled)")
    max_eccentricity: float = Field(gt=0, le=1, description="and at most this eccentricity; otherwise it is 'other'")


class ECadConfig(Strict):
    mpp: float = Field(gt=0, description="analysis resolution, µm/px")
    halo_um: float = Field(ge=0, description="context needed around each tile core, µm; covers the largest fat space and the largest cluster counted exactly")
    stain: ECadStainConfig
    tissue: ECadTissueConfig
    nuclei: NucleiConfig
    negative_nuclei: NucleiConfig | None = Field(
        None, description="detector for the E-cad-negative cells (null: the first detection for all cells); "
        "positive nuclei keep their region from nuclei")
    classes: NucleusClassesConfig
    nuclear_area_check_um2: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[low, high] µm²: a slide whose geometric mean nuclear area lies "
        "outside is flagged (a wrong pixel size?); null: not judged")
    positivity_compartment: Literal["membrane", "nucleus"] = Field(
        description="membrane: DAB in a ring just outside the nucleus (E-cadherin); nucleus: DAB inside it (Ki67-type stains)"
    )
    ring_gap_um: float = Field(ge=0, description="the ring starts this far outside the segmented nucleus, µm")
    ring_width_um: float = Field(gt=0, description="radial width of the membrane ring, µm")
    ring_sectors: int = Field(ge=1, le=64, description="angular sectors of the ring; the score is the median over sectors of each sector's peak DAB")
    ring_min_own_sectors: int | None = Field(
        None, ge=1, le=64, description="ring pixels on the border with a neighbour's territory are left out when the cell "
        "keeps at least this many sectors without them (ecad.ring_scores; null: every ring pixel counts)")
    membrane_min_dab_od: float = Field(gt=0, description="membrane score (DAB OD) at or above which a cell is E-cad positive")
    ring_holes: ECadRingHolesConfig | None = Field(
        None, description="membrane compartment: add E-cad+ cells found by their closed membrane (null: off)")
    open_membrane: ECadOpenMembraneConfig | None = Field(
        None, description="membrane compartment: positive calls outside a closed membrane need a score near that of "
        "the enclosed ones (null: off; off too without ring_holes, whose membrane level and largest enclosure it uses)")
    faint_enclosed_positive: bool = Field(
        False, description="membrane compartment, with faint_nuclei: a pale nucleus inside a closed membrane whose "
        "ring reaches membrane_min_dab_od is E-cad+ (off without ring_holes, whose membrane level and largest "
        "enclosure it uses)")
    late_rim: ECadLateRimConfig | None = Field(
        None, description="membrane compartment: late-erythroid calls need a pale rim (null: off)")
    late_erythroid_od_per_um2: float = Field(
        0.0, ge=0, description="membrane compartment: OD a late-erythroid nucleus needs per µm² above "
        "classes.late_erythroid_min_area_um2, on top of classes.late_erythroid_min_od (0: off)")
    late_caps: ECadLateCapsConfig | None = Field(
        None, description="membrane compartment: small round even caps far from other nuclei are late erythroid "
        "(null: off)")
    late_crowded: ECadLateCrowdedConfig | None = Field(
        None, description="membrane compartment: a late-erythroid call with another nucleus close by must be "
        "dense and round (null: off)")
    late_faint: ECadLateFaintConfig | None = Field(
        None, description="membrane compartment: round, solid, even pale nuclei of the faint pass are late "
        "erythroid (null: all are 'other')")
    faint_nuclei: FaintNucleiConfig | None = Field(
        None, description="membrane compartment: add pale nuclei below the nuclear mask found by local contrast "
        "in haematopoietic tissue (null: off)")
    nucleus_min_dab_od: float = Field(gt=0, description="mean nuclear DAB OD at or above which a cell is positive (compartment nucleus)")
    nucleus_stained_fraction: float | None = Field(
        None, gt=0, le=1, description="compartment nucleus: a positive nucleus keeps only its pixels whose DAB "
        "(smoothed 0.5 µm, holes filled) reaches this fraction of nucleus_min_dab_od; the rest of its first "
        "region (pale neighbours merged with it) is detected again as negative nuclei (null: the whole region)")
    clusters: ECadClustersConfig
    interpretation: ECadInterpretationConfig
    window_um: float | None = Field(gt=0, description="side of the slide-aligned windows of local counts, µm (null: none)")

    @model_validator(mode="after")
    def _halo_covers_clusters(self) -> ECadConfig:
        if self.clusters.min_extent_um >= self.halo_um:
            raise ValueError(
                f"clusters.min_extent_um={self.clusters.min_extent_um} must be below halo_um={self.halo_um}: "
                "a counted cluster must fit in one tile's halo to be counted exactly once"
            )
        return self


class ReferenceRange(Strict):
    """A normal range with its source; ``low``/``high`` may be null where no firm number exists."""

    low: float | None = Field(ge=0)
    high: float | None = Field(ge=0)
    unit: str = Field(min_length=1)
    source: str = Field(min_length=1)


class ECadReference(Strict):
    """Content of ``configs/ecad_reference.yaml``."""

    ecad_pos_per_100_nucleated: ReferenceRange
    early_erythroid_pct_of_erythroid: ReferenceRange
    left_shift_ratio: ReferenceRange
    ecad_pos_clusters: ReferenceRange


def load_ecad_reference(path: str | Path | None = None) -> ECadReference:
    """Read and validate the E-cadherin reference values (default: packaged ``ecad_reference.yaml``).

    Raises
    ------
    ConfigError
        Unreadable file or invalid content; the message names the file.
    """
    from marrowseg.config import load_reference_file  # late: the package imports this module

    return load_reference_file("ecad_reference.yaml", ECadReference, path)
