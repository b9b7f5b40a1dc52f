"""Settings of the reticulin (Gomori silver) analyzer (values live in ``configs/reticulin.yaml``).

Lengths are µm, areas µm², contrasts optical density (OD). No tunable has a default here:
the YAML file is the one place where values and their calibration are written down.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from marrowseg.config._base import Strict

GRADE_RULES = ("eumnet_30pct", "max", "majority")


class GradeThresholds(Strict):
    """Lower bounds of MF-1, MF-2 and MF-3 for each measurement (all must be met).

    A threshold of 0 means the measurement does not constrain that grade. Each list must
    be non-decreasing.
    """

    fibre_length_um_per_1e4um2: tuple[float, float, float]
    intersections_per_mm2: tuple[float, float, float]
    thick_fibre_frac: tuple[float, float, float]

    @model_validator(mode="after")
    def _non_decreasing(self) -> GradeThresholds:
        for name in type(self).model_fields:
            t = getattr(self, name)
            if any(v < 0 for v in t) or any(b < a for a, b in zip(t, t[1:], strict=False)):
                raise ValueError(f"{name}: thresholds must be >= 0 and non-decreasing, got {list(t)}")
        return self


class ReticulinConfig(Strict):
    mpp: float = Field(gt=0, description="analysis resolution, µm/px")
    halo_um: float = Field(ge=0, description="context needed around each tile core, µm")

    # -- fibre enhancement (torch) --------------------------------------------------
    chroma_penalty: float = Field(ge=0, description="fibre OD = min-channel OD minus this times the channel spread")
    half_max_radius_um: float = Field(gt=0, description="neighbourhood of the peak for the fibre's half-max body, µm")
    ridge_scales_um: tuple[float, ...] = Field(min_length=1, description="Gaussian scales of the ridge filter, µm")
    ridge_flank_factor: float = Field(gt=0, description="flank sample distance, in units of the scale")
    hysteresis_low_od: float = Field(ge=0, description="ridge contrast that may extend a fibre, OD")
    hysteresis_high_od: float = Field(ge=0, description="ridge contrast that seeds a fibre, OD")
    min_fibre_um: float = Field(ge=0, description="fibre pieces with a shorter skeleton are noise, µm")
    fibre_hole_max_um2: float = Field(
        default=0.0, ge=0, description="holes of the fibre mask up to this area are filled, µm² (0: none)")
    spur_um: float = Field(ge=0, description="skeleton side branches shorter than this are pruned, µm")
    junction_merge_um: float = Field(ge=0, description="branch points closer than this are one intersection, µm")
    background_radius_um: float = Field(gt=0, description="half-side of the grey opening giving the background under fibres, µm")
    blob_radius_um: float = Field(gt=0, description="half-side of the opening that keeps nucleus-sized dark objects, µm")
    blob_min_od: float = Field(gt=0, description="min-channel OD of a dark blob (nucleus, pigment)")
    blob_max_um2: float = Field(gt=0, description="larger dark objects are not nuclei, µm²")
    blob_halo_um: float = Field(ge=0, description="fibre pixels this close to a blob are dropped, µm")
    thick_width_um: float = Field(gt=0, description="fibres wider than this count as thick (collagen), µm")
    overlap_sigma_um: float = Field(
        ge=0, description="scale of the local fibre fraction behind the overlap correction of length, µm (0: none)")
    overlap_max_frac: float = Field(gt=0, lt=1, description="local fibre fraction is capped here (bounds the correction)")
    crossing_overlap_exponent: float = Field(
        ge=0, description="crossings are divided by (1 - p) to this power, p the local fibre cover (hole model: 1; 0: none)")
    overlap_palm: bool = Field(
        default=True, description="length factor reads the local cover less the fibre's own share (Palm/Slivnyak)")

    # -- silver-stain tissue classes ------------------------------------------------
    tissue_smooth_um: float = Field(gt=0, description="Gaussian scale of the OD used for tissue classes, µm")
    fat_max_od: float = Field(gt=0, description="mean-channel OD below which a pixel is empty (fat or glass)")
    fat_min_um2: float = Field(ge=0, description="empty regions at least this large are fat, µm²")
    fat_min_width_um: float = Field(
        default=0.0, ge=0, description="empty regions are fat only if they hold a disk this wide, µm (0: any)")
    excluded_min_um2: float = Field(gt=0, description="empty regions at least this large are glass/artefact, µm²")
    orange_min_od: float = Field(gt=0, description="blue minus red OD of golden-orange bone/collagen")
    bone_open_um: float = Field(ge=0, description="opening radius separating bone from thin collagen, µm")
    bone_max_od: float = Field(gt=0, description="mean-channel OD above which orange is a collagen bundle, not bone")
    fat_rim_um: float = Field(ge=0, description="non-empty rim around fat that still belongs to it (membranes, septa), µm")
    bone_min_um2: float = Field(ge=0, description="smallest bone fragment, µm²")
    opaque_min_od: float | None = Field(
        default=None, gt=0, description="a pixel this dark (summed RGB OD) and this grey (opaque_min_greyness) passes "
        "nearly no light: black fill or an opaque artefact, excluded; null: off")
    opaque_min_greyness: float = Field(
        default=0.85, ge=0, le=1, description="least ratio of the smallest to the largest channel OD of an opaque pixel")

    # -- grading -----------------------------------------------------------------
    window_um: float = Field(gt=0, description="side of the slide-aligned grid cells the per-tile sums are kept on, µm")
    grade_window_um: float = Field(gt=0, description="side of the sliding window, centred on each cell, that grades it, µm")
    grade_window_max_um: float = Field(gt=0, description="largest window a cell in fatty marrow is graded over, µm")
    grade_window_placement: Literal["centred", "homogeneous"] = Field(
        description="window grading a cell: centred on it, or at region borders the most homogeneous one containing it")
    grade_border_ratio: float = Field(
        gt=1, description="ratio of pooled length densities among a cell's candidate windows that marks a border")
    grade_border_density_floor_um_per_1e4um2: float = Field(
        ge=0, description="added to length densities before the border ratio and the homogeneity log, µm/1e4 µm²")
    grade_min_focus_um2: float = Field(
        0.0, ge=0, description="foci of one local grade with less haematopoietic area take the grade around them, µm²")
    window_min_haem_frac: float = Field(
        ge=0, le=1, description="haematopoietic area a grading window needs, as a fraction of grade_window_um²")
    grade_rule: Literal["eumnet_30pct", "max", "majority"]
    grade_rule_frac: float = Field(gt=0, le=1, description="share of haematopoietic area for eumnet_30pct")
    grade_borderline_margin: float = Field(
        default=0.0, ge=0, lt=1,
        description="eumnet_30pct: a deciding share this close to grade_rule_frac names the other grade (0: never)")
    grade_thresholds: GradeThresholds

    @model_validator(mode="after")
    def _consistent(self) -> ReticulinConfig:
        if self.hysteresis_low_od > self.hysteresis_high_od:
            raise ValueError(
                f"hysteresis_low_od {self.hysteresis_low_od} > hysteresis_high_od {self.hysteresis_high_od}"
            )
        ridge_reach_um = max(self.ridge_scales_um) * (3.0 + self.ridge_flank_factor)
        if 3.0 * self.overlap_sigma_um + ridge_reach_um > self.halo_um:
            # the local fibre fraction of a core pixel must read fibre mask that does not
            # depend on where the tile ends: 3 sigma, plus the ridge filter's own reach
            raise ValueError(
                f"halo_um {self.halo_um} < 3 x overlap_sigma_um {self.overlap_sigma_um} + ridge reach "
                f"{ridge_reach_um:g} µm (max ridge scale x (3 + flank factor))")
        if self.grade_window_um < self.window_um:
            raise ValueError(f"grade_window_um {self.grade_window_um} < window_um {self.window_um}")
        if self.grade_window_max_um < self.grade_window_um:
            raise ValueError(
                f"grade_window_max_um {self.grade_window_max_um} < grade_window_um {self.grade_window_um}")
        if self.fat_min_um2 > self.excluded_min_um2:
            raise ValueError(f"fat_min_um2 {self.fat_min_um2} > excluded_min_um2 {self.excluded_min_um2}")
        return self
