"""Tiled and pyramidal TIFF slides through tiffslide: SVS, generic TIFF, OME-TIFF, NDPI (planar RGB through tifffile)."""

from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from marrowseg.errors import MarrowsegError, SlideError, UnsupportedFormatError
from marrowseg.io._colour import ColourPlan, plan_colour, to_rgb_uint8
from marrowseg.io._jpeg import jpeg_problem
from marrowseg.io._mpp import (
    Candidate,
    mpp_from_aperio,
    mpp_from_ome,
    mpp_from_philips,
    mpp_from_resolution,
    resolve_mpp,
)
from marrowseg.io.base import SlideReader

__all__ = [
    "TiffReader",
    "tiff_resolution_candidate",
    "check_data_in_file",
    "check_jpeg_chunks",
    "chunk_grid",
    "jpeg_chunk_grid",
    "MAX_CHUNK_SAMPLES",
]

MAX_CHUNK_SAMPLES = 2**29
"""Largest tile or strip (samples) we agree to decode: a bigger one is a decompression bomb."""

_UM_PER_RESUNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}  # inch, cm, (tifffile) mm, µm


def tiff_resolution_candidate(page: tifffile.TiffPage) -> Candidate:
    """Pixel size from XResolution/YResolution/ResolutionUnit of ``page``.

    Parameters
    ----------
    page : tifffile.TiffPage

    Returns
    -------
    candidate : ('tiff-resolution', mpp_x_um, mpp_y_um) or None
        None without tags, with unit NONE, or with placeholder densities.
    """
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch

    def density(name: str) -> float | None:
        value = tags[name].value
        try:
            return float(Fraction(*value)) if isinstance(value, tuple) else float(value)
        except (ZeroDivisionError, TypeError, ValueError):
            return None

    return mpp_from_resolution(
        density("XResolution"),
        density("YResolution"),
        _UM_PER_RESUNIT.get(unit),
        source="tiff-resolution",
    )


def check_data_in_file(
    label: str, pages: list[tifffile.TiffPage], size_bytes: int, *, check_chunks: bool = True
) -> None:
    """Refuse truncated files and decompression bombs before any pixel is decoded.

    Parameters
    ----------
    label : str
        Path for messages.
    pages : list of tifffile.TiffPage
        One page per level.
    size_bytes : int
        File size.
    check_chunks : bool
        Also refuse a tile/strip larger than MAX_CHUNK_SAMPLES.

    Raises
    ------
    SlideError
        A strip or tile ends past the end of the file, or is absurdly large.
    """
    for level, page in enumerate(pages):
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
        if ends and max(ends) > size_bytes:
            raise SlideError(
                f"{label}: truncated or corrupt TIFF: level {level} data ends at byte "
                f"{max(ends)} but the file has {size_bytes} bytes"
            )
        if check_chunks and math.prod(page.chunks) > MAX_CHUNK_SAMPLES:
            raise SlideError(
                f"{label}: refusing to decode a {'x'.join(map(str, page.chunks))} tile/strip at "
                f"level {level} (> {MAX_CHUNK_SAMPLES} samples; decompression bomb?)"
            )


_JPEG = 7  # TIFF Compression: JPEG ("new-style", as SVS, OME-TIFF and generic pyramids write it)


def chunk_grid(page: tifffile.TiffPage) -> tuple[int, int, int] | None:
    """(chunk height, chunk width, chunks across) of an interleaved page's tiles or strips.

    None for planar pages (one set of chunks per colour) and NDPI (one JPEG stream that
    tifffile slices by its restart markers).
    """
    if int(page.planarconfig) != 1 or page.parent.is_ndpi:
        return None
    if page.is_tiled:
        h, w = int(page.tilelength), int(page.tilewidth)
    else:
        h, w = int(page.rowsperstrip), int(page.imagewidth)
    if h <= 0 or w <= 0:
        return None
    return h, w, -(-int(page.imagewidth) // w)


def jpeg_chunk_grid(page: tifffile.TiffPage) -> tuple[int, int, int] | None:
    """:func:`chunk_grid` of a JPEG-compressed page, else None (other codecs raise on a cut-short
    chunk themselves)."""
    return chunk_grid(page) if int(page.compression) == _JPEG else None


def check_jpeg_chunks(label: str, path: Path, page: tifffile.TiffPage, indices: list[int], *, level: int = 0) -> None:
    """Refuse JPEG tiles or strips of ``page`` that are cut short, before they are decoded.

    libjpeg decodes a cut-short stream without an error and fills the rest with mid-grey,
    which the analysis would take for tissue (see :mod:`marrowseg.io._jpeg`).

    Parameters
    ----------
    label : str
        Path for messages.
    path : Path
        The file, opened here on its own (the slide's handle may be in use by another thread).
    page : tifffile.TiffPage or tifffile.TiffFrame
        The page whose chunks are read; nothing is checked unless :func:`jpeg_chunk_grid` of its
        key frame is a grid.
    indices : list of int
        Chunk (tile or strip) indices to check, row-major.
    level : int
        Pyramid level, for messages.

    Raises
    ------
    SlideError
        A chunk is not a whole JPEG stream; the message gives its pixel position in the level.
    """
    key = page.keyframe  # a TiffFrame keeps its tags in its key frame
    grid = jpeg_chunk_grid(key)
    if grid is None or not indices:
        return
    h, w, across = grid
    offsets, counts = page.dataoffsets, page.databytecounts
    kind = "tile" if key.is_tiled else "strip"
    with open(path, "rb") as fh:
        for i in indices:
            if not counts[i]:  # a sparse chunk: tifffile gives the fill value, not a decode
                continue
            fh.seek(offsets[i])
            problem = jpeg_problem(fh.read(counts[i]))
            if problem is not None:
                row, col = divmod(i, across)
                raise SlideError(
                    f"{label}: corrupt JPEG {kind} at x={col * w},y={row * h} of level {level}: {problem}"
                )


class _PlanarTiff:
    """What :class:`TiffReader` uses of a ``TiffSlide``, from tifffile alone, for planar RGB.

    tiffslide refuses series with axes ``'SYX'`` (PlanarConfiguration 2: one plane per colour, as
    some OME-TIFF converters write); tifffile's zarr store reads their tiles all the same.
    """

    def __init__(self, path: Path) -> None:
        self.ts_tifffile = tifffile.TiffFile(path)
        try:
            series = self.ts_tifffile.series[0]
            group = zarr.open(series.aszarr(), mode="r")
            self.zarr_group = {"0": group} if isinstance(group, zarr.Array) else group
            self.level_dimensions = tuple((int(lvl.shape[2]), int(lvl.shape[1])) for lvl in series.levels)
        except BaseException:
            self.ts_tifffile.close()
            raise
        self.properties = {"tiffslide.series-index": 0, "tiffslide.series-axes": "SYX"}

    def close(self) -> None:
        self.ts_tifffile.close()


class TiffReader(SlideReader):
    """A TIFF slide read with tiffslide, one window of one level at a time.

    Parameters
    ----------
    path : Path
        The TIFF file.
    mpp : float, optional
        Level-0 pixel size override, µm per pixel.
    """

    backend = "tiffslide"

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        super().__init__(path=path, name=path.name)
        slide = self._open_handle()
        try:
            self._init_from(slide, mpp)
        except BaseException:
            slide.close()
            raise
        self._handle = slide
        self._handle_pid = os.getpid()
        self._log_conversion(self._plan.describe())

    def _init_from(self, slide: Any, mpp: float | None) -> None:
        label = str(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tiffslide's "partially implemented" notes
                props = dict(slide.properties)
            tf: tifffile.TiffFile = slide.ts_tifffile
            series = tf.series[int(props.get("tiffslide.series-index") or 0)]
            axes = props["tiffslide.series-axes"]
            level_dims = [tuple(map(int, d)) for d in slide.level_dimensions]
            pages = [lvl.keyframe for lvl in series.levels]
            page0 = pages[0]
            description = page0.description or ""
            ome_xml = tf.ome_metadata if tf.is_ome else None
            is_ndpi = tf.is_ndpi
            dtype = np.dtype(series.dtype)
            smax = page0.tags.get("SMaxSampleValue")
        except MarrowsegError:
            raise
        except NotImplementedError as exc:
            raise UnsupportedFormatError(f"{label}: unsupported TIFF layout: {exc}") from exc
        except Exception as exc:
            raise SlideError(
                f"{label}: cannot read TIFF structure: {type(exc).__name__}: {exc}"
            ) from exc
        if any(w <= 0 or h <= 0 for w, h in level_dims):
            raise SlideError(f"{label}: zero-size image (levels {level_dims})")
        check_data_in_file(label, pages, self.path.stat().st_size, check_chunks=not is_ndpi)
        self._set_levels(level_dims)
        self._axes = axes
        if axes == "YXS":
            n_channels = int(series.shape[-1])
        elif axes in ("CYX", "SYX"):
            n_channels = int(series.shape[0])
        elif axes == "YX":
            n_channels = 1
        else:
            raise UnsupportedFormatError(f"{label}: unsupported TIFF axes {axes!r}")
        value_max = None
        if smax is not None and np.issubdtype(dtype, np.floating):
            value_max = float(np.max(smax.value))
        self._plan: ColourPlan = plan_colour(label, dtype, n_channels, value_max=value_max)
        tiffslide_mpp: Candidate = None
        if "tiff.XResolution" not in props:  # else tiffslide copied the resolution tags
            mx, my = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
            if mx is not None and my is not None:
                tiffslide_mpp = ("tiffslide", float(mx), float(my))
        self.mpp, self.mpp_source = resolve_mpp(
            label,
            mpp,
            [
                mpp_from_aperio(description),
                mpp_from_ome(ome_xml),
                mpp_from_philips(description),
                tiff_resolution_candidate(page0),
                tiffslide_mpp,
            ],
        )
        self.vendor = props.get("tiffslide.vendor") or ("ome" if ome_xml else None)
        self._props = props
        self._series_index = int(props.get("tiffslide.series-index") or 0)
        self._jpeg_ok: set[tuple[int, int]] = set()  # (level, chunk) already found whole
        self._chunk_infos: dict[int, Any] = {}  # level -> _chunk_info

    def _open_handle(self) -> Any:
        import tiffslide

        try:
            slide = tiffslide.TiffSlide(self.path)
            if slide.ts_tifffile.series and slide.ts_tifffile.series[0].axes == "SYX":
                slide.close()
                return _PlanarTiff(self.path)
            return slide
        except tifffile.TiffFileError as exc:
            raise SlideError(f"{self.path}: corrupt or truncated TIFF: {exc}") from exc
        except Exception as exc:
            raise SlideError(f"{self.path}: cannot open TIFF: {type(exc).__name__}: {exc}") from exc

    def _close_handle(self, handle: Any) -> None:
        handle.close()

    def _read_level(
        self, handle: Any, level: int, x0: int, y0: int, x1: int, y1: int
    ) -> np.ndarray:
        info = self._chunk_info(handle, level)
        ids: list[int] = []
        if info is not None and (info[1] or info[2]):
            (h, w, across), jpeg, _ = info
            ids = [r * across + c for r in range(y0 // h, (y1 - 1) // h + 1) for c in range(x0 // w, (x1 - 1) // w + 1)]
            todo = [i for i in ids if (level, i) not in self._jpeg_ok] if jpeg else []
            if todo:
                page = handle.ts_tifffile.series[self._series_index].levels[level].pages[0]
                check_jpeg_chunks(str(self.path), self.path, page, todo, level=level)
                self._jpeg_ok.update((level, i) for i in todo)
        arr = handle.zarr_group[str(level)]
        if self._axes in ("CYX", "SYX"):
            data = np.moveaxis(np.asarray(arr[:, y0:y1, x0:x1]), 0, -1)
        else:
            data = np.asarray(arr[y0:y1, x0:x1])
        rgb = to_rgb_uint8(data, self._plan)
        if info is not None and info[2]:
            (h, w, across), _, sparse = info
            # tifffile fills a chunk never written (byte count 0) with 0, black, which reads as
            # dense tissue; on a brightfield slide it is unscanned glass (OpenSlide gives it as
            # transparent, which to_rgb_uint8 composites over white too)
            for i in sparse.intersection(ids):
                r, c = divmod(i, across)
                rgb[max(r * h - y0, 0) : max((r + 1) * h - y0, 0), max(c * w - x0, 0) : max((c + 1) * w - x0, 0)] = 255
        return rgb

    def _chunk_info(self, handle: Any, level: int) -> tuple[tuple[int, int, int], bool, frozenset[int]] | None:
        """(:func:`chunk_grid`, JPEG-compressed?, sparse chunk ids) of a level, read once per level.

        None where chunks are not checked: planar or multi-page levels and NDPI.
        """
        if level not in self._chunk_infos:
            info = None
            if self._axes in ("YXS", "YX"):
                lvl = handle.ts_tifffile.series[self._series_index].levels[level]
                grid = chunk_grid(lvl.keyframe) if len(lvl.pages) == 1 else None
                if grid is not None:
                    counts = lvl.pages[0].databytecounts
                    info = (grid, jpeg_chunk_grid(lvl.keyframe) is not None,
                            frozenset(i for i, n in enumerate(counts) if n == 0))
            self._chunk_infos[level] = info
        return self._chunk_infos[level]

    def _load_properties(self) -> dict[str, Any]:
        return dict(self._props)
