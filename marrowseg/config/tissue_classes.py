"""Settings of the tissue classes haematopoietic / fat / bone / excluded.

Values live in YAML; see :mod:`marrowseg.analyzers.tissue` for the method.
"""

from __future__ import annotations

from pydantic import Field

from marrowseg.config._base import Strict

__all__ = ["CrushConfig", "TissueClassesConfig"]


class CrushConfig(Strict):
    """Crush artefact: marrow whose haematoxylin runs in parallel strands (see :mod:`marrowseg.analyzers.crush`)."""

    sigma_um: float = Field(gt=0, description="Gaussian window of the structure tensor, µm")
    min_coherence: float = Field(ge=0, le=1, description="least coherence of the haematoxylin's direction (0 none, 1 parallel strands)")
    min_h_od: float = Field(ge=0, description="least local mean haematoxylin (h_ctx), OD: crushed chromatin is smeared over the whole area")
    min_support: float = Field(ge=0, le=1, description="least share of the window that is marrow: the edges of fat spaces, glass and bone have a direction of their own")
    open_um: float = Field(ge=0, description="opening radius of the crushed pixels, µm")
    min_area_um2: float = Field(ge=0, description="smaller crushed-looking patches stay marrow, µm²")
    close_um: float = Field(ge=0, description="closing radius that gives the crushed area the marrow strips and small fat spaces inside it, µm")
    fat_band_um: float = Field(gt=0, description="a fat space is crushed with the marrow when most of the marrow within this distance of it is crushed, µm")


class TissueClassesConfig(Strict):
    """Thresholds and sizes of the tissue classification (µm, µm², OD)."""

    class_mpp: float = Field(gt=0, description="resolution of the tissue label map, µm/px (rounded to an integer multiple of the analysis mpp)")
    bright_sigma_um: float = Field(ge=0, description="smoothing before the unstained-pixel threshold, µm")
    bright_max_od: float = Field(gt=0, description="summed RGB OD below which a pixel is unstained (fat lumen or glass)")
    fat_min_diameter_um: float = Field(gt=0, description="smaller unstained holes belong to the tissue around them, µm (equivalent diameter)")
    fat_max_diameter_um: float = Field(gt=0, description="larger unstained regions are background, µm (equivalent diameter)")
    fat_min_solidity: float = Field(ge=0, le=1, description="less convex unstained regions are tears or background")
    # optional so that stain files written before it (ecad) still load; null = no envelope
    envelope_um: float | None = Field(None, ge=0, description="closing radius of the tissue outline; unstained space outside it is glass, µm (2x must fit in the halo); null: off")
    membrane_um: float = Field(ge=0, description="closing radius that gives the thin membranes between fat spaces to fat, µm")
    context_sigma_um: float = Field(gt=0, description="Gaussian sigma of the stain densities used for bone, µm")
    bone_min_eosin_od: float = Field(ge=0, description="local mean eosin OD of bone matrix")
    bone_max_haem_od: float = Field(ge=0, description="local mean haematoxylin OD above which tissue is cellular, not bone")
    bone_min_area_um2: float = Field(ge=0, description="smaller bone-like patches are haematopoietic tissue, µm²")
    bone_open_um: float = Field(ge=0, description="opening radius that removes thin eosinophilic strands from bone, µm")
    # optional (ecad and older stain files): off unless set
    fat_split_um: float | None = Field(None, gt=0, description="a failed unstained region is cut at necks between distance-transform maxima deeper than this, µm (adjacent spaces with an invisible membrane); null: off")
    envelope_fat: bool = Field(False, description="clear spaces walled in by tissue are inside the outline whatever their width, and a fat space bordering the glass cut off by the envelope gets back the glass inside its convex hull (peripheral adipocytes)")
    fat_rim_um: float | None = Field(None, ge=0, description="stained tissue within this distance of a fat space is its membrane, fat, µm; null: off")
    stained_closing_min_haem_od: float | None = Field(
        None, ge=0, description="with stained_closing_um, clear pixels the closing would fill stay clear where the "
        "local haematoxylin (h_ctx) is below this, OD: the corners of fat spaces hold no nucleus, the gaps between "
        "nuclei do; null: the closing fills both")
    clear_max_od_excess: float | None = Field(
        None, ge=0, description="a clear region (below bright_max_od) no larger than a fat space whose mean summed OD "
        "lies more than this above the fat level (the tile's large fat-sized clear regions, else the slide's clear "
        "level: median summed OD of its clear sample pixels) is pale tissue, not a fat space; null: off (H&E: eosin "
        "stains the cytoplasm)")
    context_over_tissue: bool = Field(False, description="the bone test's local densities are means over the stained tissue in the context window, not over every pixel: beside a fat space or the glass a plain mean falls to about half, and a rim of bone several µm wide read as haematopoietic")
    stained_closing_um: float | None = Field(None, gt=0, description="closing radius of the stained pixels before the unstained regions are judged, µm: an IHC counterstain leaves the cytoplasm between nuclei unstained, and those gaps joined the fat spaces into regions judged background; null: off (H&E's eosin stains the cytoplasm)")
    opaque_min_od: float | None = Field(None, gt=0, description="a class pixel this dark (summed RGB OD of its mean colour) and this grey (opaque_min_greyness) is no stain but black fill or marker ink: excluded, and treated as outside the slide; null: off")
    opaque_min_greyness: float = Field(0.85, ge=0, le=1, description="least ratio of the smallest to the largest channel OD of an opaque pixel (1: neutral grey or black; haematoxylin, eosin and DAB stay below 0.75)")
    crush: CrushConfig | None = Field(None, description="marrow read as crushed is excluded; null: off")
