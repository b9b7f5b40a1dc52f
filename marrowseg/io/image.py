"""Plain images (PNG, JPEG, BMP, untiled TIFF) as a one-level slide, decoded whole."""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from marrowseg.errors import MarrowsegError, SlideError, UnsupportedFormatError
from marrowseg.io._colour import plan_colour, to_rgb_uint8
from marrowseg.io._jpeg import jpeg_problem
from marrowseg.io._mpp import Candidate, mpp_from_resolution, resolve_mpp
from marrowseg.io.base import SlideReader

__all__ = ["ImageReader", "MAX_DECODE_PX", "read_header"]

logger = logging.getLogger(__name__)

MAX_DECODE_PX = 2**31
"""Largest image (pixels) decoded whole; a header claiming more is refused (decompression bomb)."""

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageHeader:
    """What a header claims, read before decoding.

    Attributes
    ----------
    width, height : int
        Pixels.
    mpp : candidate or None
        Pixel size from the header's density field, if meaningful.
    """

    width: int
    height: int
    mpp: Candidate = None


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    mpp = None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            break
        if kind == b"pHYs" and length == 9 and pos + 17 <= len(data):
            ppx, ppy, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            mpp = mpp_from_resolution(ppx, ppy, 1e6 if unit == 1 else None, source="png-phys")
        pos += 12 + length
    return ImageHeader(width, height, mpp)


_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_header(data: bytes) -> ImageHeader:
    pos, mpp = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"bad marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        seg = data[pos + 4 : pos + 2 + length]
        if marker == 0xE0 and seg[:5] == b"JFIF\x00" and len(seg) >= 12:
            unit, dx, dy = struct.unpack(">BHH", seg[7:12])
            mpp = mpp_from_resolution(dx, dy, {1: 25400.0, 2: 10000.0}.get(unit), source="jfif")
        if marker in _SOF_MARKERS:
            if len(seg) < 5:
                raise ValueError("short SOF segment")
            height, width = struct.unpack(">HH", seg[1:5])
            return ImageHeader(width, height, mpp)
        if marker == 0xDA:
            break
        pos += 2 + length
    raise ValueError("no frame header (SOF) before the image data")


def _bmp_header(data: bytes) -> ImageHeader:
    if len(data) < 26:
        raise ValueError("header shorter than 26 bytes")
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:
        width, height = struct.unpack("<HH", data[18:22])
        return ImageHeader(width, height)
    width, height = struct.unpack("<ii", data[18:26])
    mpp = None
    if len(data) >= 46:
        ppx, ppy = struct.unpack("<ii", data[38:46])
        mpp = mpp_from_resolution(ppx, ppy, 1e6, source="bmp-resolution")
    return ImageHeader(abs(width), abs(height), mpp)


def read_header(label: str, fmt: str, head: bytes) -> ImageHeader:
    """Parse a PNG/JPEG/BMP header without decoding pixels.

    Parameters
    ----------
    label : str
        Path for messages.
    fmt : {'png', 'jpeg', 'bmp'}
    head : bytes
        The first bytes of the file (64 KiB is plenty).

    Returns
    -------
    header : ImageHeader

    Raises
    ------
    SlideError
        The header is malformed.
    """
    parse = {"png": _png_header, "jpeg": _jpeg_header, "bmp": _bmp_header}[fmt]
    try:
        return parse(head)
    except (ValueError, struct.error) as exc:
        raise SlideError(f"{label}: corrupt {fmt.upper()} header: {exc}") from exc


def _decode(fmt: str, data: bytes) -> np.ndarray:
    import imagecodecs

    if fmt == "png":
        return imagecodecs.png_decode(data)
    if fmt == "jpeg":
        return imagecodecs.jpeg8_decode(data)
    if fmt == "bmp":
        return imagecodecs.bmp_decode(data)
    raise AssertionError(fmt)


class ImageReader(SlideReader):
    """A plain image decoded whole into memory and read as a one-level slide.

    Parameters
    ----------
    path : Path
    fmt : {'png', 'jpeg', 'bmp', 'tiff'}
        The format the content was sniffed as.
    mpp : float, optional
        Pixel size override, µm per pixel.

    Notes
    -----
    The header is checked (zero size, more than MAX_DECODE_PX pixels,
    truncated TIFF strips) before anything is decoded. The decoded image is
    not pickled; a copy decodes the file again on first read.
    """

    backend = "image"

    def __init__(self, path: Path, *, fmt: str, mpp: float | None = None) -> None:
        super().__init__(path=path, name=path.name)
        self._fmt = fmt
        label = str(path)
        if fmt == "tiff":
            width, height, candidate, self._props = self._tiff_header()
        else:
            with open(path, "rb") as fh:
                head = fh.read(65536)
            header = read_header(label, fmt, head)
            width, height, candidate = header.width, header.height, header.mpp
            self._props = {"image.format": fmt}
        if width <= 0 or height <= 0:
            raise SlideError(f"{label}: zero-size image ({width}x{height} px in the header)")
        if width * height > MAX_DECODE_PX:
            raise SlideError(
                f"{label}: header claims {width}x{height} px ({width * height:.3g} px), more than "
                f"{MAX_DECODE_PX} px for an untiled image that must be decoded whole "
                "(decompression bomb?)"
            )
        self._set_levels([(width, height)])
        self.mpp, self.mpp_source = resolve_mpp(label, mpp, [candidate])
        self._plan = None
        rgb = self._open_handle()
        self._handle, self._handle_pid = rgb, os.getpid()

    def _tiff_header(self) -> tuple[int, int, Candidate, dict[str, Any]]:
        import tifffile

        from marrowseg.io.tiff import check_data_in_file, tiff_resolution_candidate

        try:
            with tifffile.TiffFile(self.path) as tf:
                page = tf.pages.first
                shape = dict(zip(page.axes, page.shape, strict=False))
                check_data_in_file(
                    str(self.path), [page], self.path.stat().st_size, check_chunks=False
                )
                return (
                    int(shape.get("X", 0)),
                    int(shape.get("Y", 0)),
                    tiff_resolution_candidate(page),
                    {"image.format": "tiff", "tiff.axes": page.axes, "tiff.dtype": str(page.dtype)},
                )
        except MarrowsegError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{self.path}: corrupt or truncated TIFF: {type(exc).__name__}: {exc}"
            ) from exc

    def _open_handle(self) -> np.ndarray:
        label = str(self.path)
        try:
            if self._fmt == "tiff":
                import tifffile

                from marrowseg.io.tiff import check_jpeg_chunks

                with tifffile.TiffFile(self.path) as tf:
                    page = tf.pages.first
                    check_jpeg_chunks(label, self.path, page, list(range(len(page.dataoffsets))))
                    arr = page.asarray()
                    axes = page.axes
                if axes.startswith("S"):
                    arr = np.moveaxis(arr, 0, -1)
                    axes = axes[1:] + "S"
                if axes not in ("YX", "YXS"):
                    raise UnsupportedFormatError(f"{label}: unsupported TIFF axes {axes!r}")
            else:
                data = self.path.read_bytes()
                problem = jpeg_problem(data) if self._fmt == "jpeg" else None
                if problem is not None:
                    # libjpeg would fill what is missing with grey and say nothing
                    raise SlideError(f"{label}: corrupt JPEG: {problem}; an incomplete copy or download?")
                arr = _decode(self._fmt, data)
        except MarrowsegError:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{label}: cannot decode {self._fmt.upper()} image: {type(exc).__name__}: {exc}"
            ) from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self._fmt == "jpeg" and arr.ndim == 3 and arr.shape[2] == 4:
            # Four JPEG components are CMYK, stored inverted (Adobe): R = C' * K' / 255.
            arr = (arr[:, :, :3].astype(np.uint16) * arr[:, :, 3:] + 127) // 255
            arr = arr.astype(np.uint8)
            logger.info("%r: colour converted: CMYK JPEG to RGB", self)
        if arr.ndim != 3 or (arr.shape[1], arr.shape[0]) != self.dimensions:
            raise SlideError(
                f"{label}: decoded shape {arr.shape} does not match the header's "
                f"{self.dimensions[0]}x{self.dimensions[1]} px"
            )
        value_max = None
        if np.issubdtype(arr.dtype, np.floating):
            value_max = 255.0 if float(np.nanmax(arr)) > 1.0 else 1.0
        plan = plan_colour(label, arr.dtype, arr.shape[2], value_max=value_max)
        if self._plan is None:
            self._plan = plan
            self._log_conversion(plan.describe())
        return to_rgb_uint8(arr, plan)

    def _read_level(
        self, handle: np.ndarray, level: int, x0: int, y0: int, x1: int, y1: int
    ) -> np.ndarray:
        return handle[y0:y1, x0:x1]

    def _load_properties(self) -> dict[str, Any]:
        return dict(self._props)
