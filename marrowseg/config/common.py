"""Configuration models shared by every stain: tissue detection, tiling, engine, outputs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from marrowseg.config._base import Strict as _Strict
from marrowseg.config.ecad import ECadConfig
from marrowseg.config.he import HEConfig
from marrowseg.config.reticulin import ReticulinConfig


class TissueConfig(_Strict):
    """Low-resolution tissue detection (see :func:`marrowseg.tiling.tissue_mask`)."""

    mpp: float = Field(gt=0, description="resolution of the mask, µm/px")
    min_od: float = Field(ge=0, description="lower limit of the Otsu threshold on mean RGB OD")
    max_od: float = Field(gt=0, description="upper limit: pixels above it are never glass")
    min_saturation: float = Field(ge=0, le=1, description="lower limit of the Otsu threshold on HSV saturation")
    max_saturation: float = Field(gt=0, le=1, description="upper limit: pixels above it are never glass")
    min_object_um2: float = Field(ge=0)
    max_hole_um2: float = Field(ge=0)
    margin_um: float = Field(ge=0, description="dilation of the mask so tiles reach the tissue edge")
    focus_min: float | None = Field(
        0.15, ge=0, description="a tile whose tissue is less sharp than this (marrowseg.focus.tile_focus: RMS "
        "Laplacian per unit darkness at the analysis resolution) is out of focus; null: no focus check")
    focus_min_tissue_um2: float = Field(
        10000.0, ge=0, description="a tile with less tissue than this in its measured window is not judged, µm²")
    white_balance: bool = Field(
        True, description="bring every tile to the slide's glass (white point from the overview's clear pixels, "
        "marrowseg.stains.white_point): optical densities are then relative to the glass, not to 255")
    white_min_level: float = Field(
        200.0, ge=0, le=255, description="least intensity of every channel of a clear pixel, and the darkest "
        "white point accepted; a field with too few such pixels is read as it is")
    white_calibrated: float = Field(
        250.0, ge=0, le=255, description="a white point this bright in every channel is a calibrated scan, read as "
        "it is (its offset, <= 0.009 OD a channel, is below what the thresholds resolve)")


class TilingConfig(_Strict):
    """Tile grid at the analyzer's resolution."""

    tile_px: int = Field(ge=32, le=8192)
    overlap_px: int = Field(ge=0)


class EngineConfig(_Strict):
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    batch_size: int = Field(ge=1, le=1024)
    workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"]
    threads: Annotated[int, Field(ge=1, le=512)] | Literal["auto"]
    post_threads: Annotated[int, Field(ge=0, le=64)] | Literal["auto"]
    prefetch_batches: int = Field(ge=1, le=16)
    memory_mb: int | None = Field(
        3000, ge=256, description="automatic CPU tile workers are as many as keep the run's estimated resident "
        "memory (Analyzer.memory_estimate_mb) within this and within the memory the system reports available, "
        "MB (null: cores alone decide)")
    amp: bool
    seed: int = Field(ge=0)


class OutputConfig(_Strict):
    small_image_px: int = Field(ge=0, description="inputs at most this size get labels.png and overlay.png")
    thumbnail_px: int = Field(ge=64)
    zarr_chunk_px: int = Field(ge=64)


class Config(_Strict):
    """The whole resolved configuration of one analysis."""

    tissue: TissueConfig
    tiling: TilingConfig
    engine: EngineConfig
    output: OutputConfig
    he: HEConfig
    ecad: ECadConfig
    reticulin: ReticulinConfig

    def stain_section(self, stain: str) -> BaseModel:
        """The analyzer settings for ``stain``."""
        return getattr(self, stain)
