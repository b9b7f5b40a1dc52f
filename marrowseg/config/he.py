"""Settings of the H&E analyzer (values live in ``configs/he.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from marrowseg.config._base import Strict
from marrowseg.config.nuclei import FaintNucleiConfig, NucleiConfig, NucleusClassesConfig
from marrowseg.config.tissue_classes import TissueClassesConfig
from marrowseg.errors import ConfigError

__all__ = [
    "HEConfig",
    "HEStainConfig",
    "CellularityBand",
    "CellularityRule",
    "CellularityReference",
    "load_cellularity_reference",
]


class HEStainConfig(Strict):
    """Which haematoxylin and eosin vectors deconvolve the slide."""

    vectors: Literal["ruifrok", "macenko", "reference"] = Field(
        description="ruifrok: fixed published vectors; macenko: estimated per slide in prepare(), "
        "kept only if each lies within max_angle_deg of its Ruifrok vector; reference: the slide's Macenko "
        "estimate is mapped onto reference_h / reference_e (the same estimator's reading of the stain the "
        "thresholds were chosen on) before the Ruifrok deconvolution, for the nuclei only, when the estimate "
        "lies between the two reference_angle_deg from the reference (and within max_angle_deg)"
    )
    reference_h: tuple[float, float, float] | None = Field(
        None, description="vectors: reference: the Macenko haematoxylin vector of the development stain (RGB OD)")
    reference_e: tuple[float, float, float] | None = Field(
        None, description="vectors: reference: the Macenko eosin vector of the development stain (RGB OD)")
    reference_angle_deg: tuple[float, float] = Field(
        (0.0, 90.0), description="vectors: reference: a slide is mapped onto the reference stain only when its "
        "haematoxylin or eosin estimate lies more than the first angle from the reference vector, and neither "
        "more than the second; otherwise it is deconvolved as it is (Ruifrok), degrees")
    macenko_min_od: float = Field(ge=0, description="summed OD of pixels used by the estimate")
    macenko_percentile: float = Field(gt=0, lt=50, description="robust angle extreme, percent")
    max_angle_deg: float = Field(gt=0, le=90, description="largest accepted deviation of an estimated vector from its Ruifrok vector (macenko) or its reference vector (reference), degrees")
    h_reference_od: float | None = Field(
        None, gt=0, description="haematoxylin floor: a slide whose nuclear level (the h_reference_percentile of "
        "nuclear pixels: haematoxylin above eosin and above 0.15 OD, among tissue pixels of the stain sample) "
        "is below this OD is scaled up to it, within h_scale_limits; null: never brighter")
    h_ceiling_od: float | None = Field(
        None, gt=0, description="haematoxylin ceiling: a slide whose nuclear level (as for h_reference_od) is above "
        "this OD is scaled down to it, within h_scale_limits (a thicker section or a heavier staining run); "
        "null: never darker")
    h_reference_percentile: float = Field(90.0, gt=50, lt=100, description="percentile of nuclear haematoxylin, %")
    h_tissue_min_od: float = Field(0.15, ge=0, description="summed RGB OD of a tissue pixel for the percentile")
    h_scale_limits: tuple[float, float] = Field(
        (0.5, 1.5), description="the scale is clipped to these bounds; a lower bound of 1 never darkens a slide, "
        "whatever h_ceiling_od says")
    tissue_follows_floor: bool = Field(
        True, description="a slide brought up to h_reference_od (a pale run, a thin section) has its tissue-class "
        "densities (summed OD, eosin) brought up by the same factor, so that pale fat membranes still close their "
        "spaces and pale bone stays bone; a darker slide's tissue densities are left as read")

    @property
    def scales_haematoxylin(self) -> bool:
        """Whether a per-slide haematoxylin scale is looked for (a floor, a ceiling or both)."""
        return self.h_reference_od is not None or self.h_ceiling_od is not None

    @model_validator(mode="after")
    def _ceiling_above_floor(self) -> HEStainConfig:
        if self.vectors == "reference" and (self.reference_h is None or self.reference_e is None):
            raise ValueError("he.stain.vectors: reference needs reference_h and reference_e")
        if not 0 <= self.reference_angle_deg[0] < self.reference_angle_deg[1] <= 90:
            raise ValueError(f"reference_angle_deg {self.reference_angle_deg}: need 0 <= low < high <= 90")
        lo, hi = self.h_scale_limits
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"h_scale_limits {self.h_scale_limits}: need 0 < low <= 1 <= high")
        if self.h_reference_od is not None and self.h_ceiling_od is not None and self.h_ceiling_od < self.h_reference_od:
            raise ValueError(f"h_ceiling_od {self.h_ceiling_od} is below h_reference_od {self.h_reference_od}")
        return self


class HEConfig(Strict):
    mpp: float = Field(gt=0, description="analysis resolution, µm/px")
    halo_um: float = Field(ge=0, description="context needed around each tile core, µm; must cover the largest fat space")
    stain: HEStainConfig
    tissue: TissueClassesConfig
    nuclei: NucleiConfig
    classes: NucleusClassesConfig
    faint_nuclei: FaintNucleiConfig | None = Field(
        None, description="classical detector: add pale nuclei below the nuclear mask, found by local contrast in "
        "haematopoietic tissue (nuclei.faint_nuclei; null: off)")
    adipocyte_bins_um2: list[float] = Field(min_length=2, description="fixed edges of the adipocyte area histogram, µm²")
    window_um: float | None = Field(gt=0, description="side of the slide-aligned windows for local cellularity, µm (null: none)")
    cellularity_rule: str = Field(min_length=1, description="name of a rule in configs/cellularity_reference.yaml")
    nuclear_area_check_um2: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[low, high] µm²: a slide whose geometric mean nuclear area lies "
        "outside is flagged (a wrong pixel size?); null: not judged")

    @field_validator("adipocyte_bins_um2")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)) or v[0] < 0:
            raise ValueError("bin edges must be >= 0 and strictly increasing")
        return v


class CellularityBand(Strict):
    """Normal cellularity for ages ``age_min <= age < age_max`` (years), percent."""

    age_min: float = Field(ge=0)
    age_max: float = Field(gt=0)
    low_pct: float = Field(ge=0, le=100)
    high_pct: float = Field(ge=0, le=100)


class CellularityRule(Strict):
    """One age-adjusted reference: a table of age bands, or 100 minus age ± tolerance."""

    kind: Literal["table", "hundred_minus_age"]
    source: str = Field(min_length=1, description="citation of the rule")
    bands: list[CellularityBand] | None = None
    tolerance_pct: float | None = Field(None, ge=0, le=50)

    @field_validator("bands")
    @classmethod
    def _ordered(cls, v: list[CellularityBand] | None) -> list[CellularityBand] | None:
        if v is not None:
            for b in v:
                if b.age_max <= b.age_min or b.high_pct < b.low_pct:
                    raise ValueError(f"empty band {b.model_dump()}")
            for a, b in zip(v, v[1:], strict=False):
                if b.age_min != a.age_max:
                    raise ValueError("bands must be contiguous and sorted by age")
        return v


class CellularityReference(Strict):
    """Content of ``configs/cellularity_reference.yaml``."""

    rules: dict[str, CellularityRule]


def load_cellularity_reference(path: str | Path | None = None) -> CellularityReference:
    """Read and validate the age table (default: the packaged ``cellularity_reference.yaml``).

    Raises
    ------
    ConfigError
        Unreadable file or invalid content; the message names the file.
    """
    from marrowseg.config import (  # late: the package imports this module
        config_dir,
        load_reference_file,
    )

    p = Path(path) if path is not None else config_dir() / "cellularity_reference.yaml"
    ref = load_reference_file("cellularity_reference.yaml", CellularityReference, p)
    for name, rule in ref.rules.items():
        if rule.kind == "table" and not rule.bands:
            raise ConfigError(f"{p}: rule {name!r} of kind 'table' needs 'bands'")
        if rule.kind == "hundred_minus_age" and rule.tolerance_pct is None:
            raise ConfigError(f"{p}: rule {name!r} of kind 'hundred_minus_age' needs 'tolerance_pct'")
    return ref
