"""``open_slide``: the one entry point that checks content, then picks a backend."""

from __future__ import annotations

import logging
import math
import os
import struct
from pathlib import Path

import numpy as np

from marrowseg.errors import MarrowsegError, SlideError, UnsupportedFormatError
from marrowseg.io.base import SlideReader

__all__ = ["open_slide", "sniff_format", "LAZY_TIFF_MIN_PX"]

LAZY_TIFF_MIN_PX = 2**26
"""An untiled TIFF bigger than this with several strips is read lazily (strips as chunks)."""

logger = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# MIRAX, Hamamatsu VMS/VMU, Zeiss CZI and Sakura SVSLIDE (an SQLite file): OpenSlide reads them, tiffslide does not
_OPENSLIDE_ONLY = frozenset({".mrxs", ".vms", ".vmu", ".czi", ".svslide"})
_OPENSLIDE_PREFERRED = frozenset({".scn", ".bif"})


def sniff_format(head: bytes) -> str | None:
    """Name the container from its first bytes.

    Parameters
    ----------
    head : bytes
        At least the first 132 bytes of the file (fewer for tiny files).

    Returns
    -------
    fmt : {'tiff', 'png', 'jpeg', 'bmp', 'dicom'} or None
    """
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def _first_ifd_past_end(head: bytes, size: int) -> int | None:
    """Offset of a TIFF's first image directory when it lies at or past the end of the file.

    Aperio and others write the directories after the pixel data, so a copy cut short loses
    them; tifffile then fails with an error that does not say so (``IndexError: 0``).
    """
    if len(head) < 16:
        return None
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    return offset if offset >= size else None


def _tiff_is_slide(path: Path) -> bool:
    """True when tiffslide should read ``path`` (tiled, pyramidal, vendor or big striped)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if path.suffix.lower() == ".svs" and not tf.is_svs:
                logger.info("%s: named .svs but has no Aperio description; read as TIFF", path)
            if tf.is_svs or tf.is_ome or tf.is_ndpi or tf.is_scn or tf.is_bif or tf.is_philips:
                return True
            page = tf.pages.first
            if page.is_tiled or len(tf.series[0].levels) > 1:
                return True
            pixels = math.prod(page.shape[:2]) if page.shape else 0
            return pixels > LAZY_TIFF_MIN_PX and len(page.dataoffsets) > 1
    except Exception as exc:
        raise SlideError(f"{path}: corrupt or truncated TIFF: {type(exc).__name__}: {exc}") from exc


def _needs_openslide(path: Path, what: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"{path}: {what} needs OpenSlide, which is not installed "
        "(pip install 'marrowseg[openslide]')"
    )


def open_slide(
    source: str | os.PathLike[str] | np.ndarray, mpp: float | None = None
) -> SlideReader:
    """Open a whole-slide image, a plain image or an array as a :class:`SlideReader`.

    Parameters
    ----------
    source : str, PathLike or (H, W[, C]) ndarray
        A slide file (SVS, TIFF, OME-TIFF, NDPI; MRXS/VMS/VMU/SCN/BIF/DICOM
        with OpenSlide), a PNG/JPEG/BMP, or an array (a virtual slide).
    mpp : float, optional
        Level-0 pixel size, µm per pixel; overrides the metadata. Required for
        an array.

    Returns
    -------
    reader : SlideReader

    Raises
    ------
    SlideError
        Missing file, directory, empty file, truncated or corrupt file,
        zero-size image, decompression bomb; the message starts with the path.
    UnsupportedFormatError
        Not an image, or a format whose backend is not installed.
    MissingMppError
        No pixel size in the metadata and no ``mpp``.

    Examples
    --------
    >>> import numpy as np
    >>> with open_slide(np.zeros((64, 96, 3), np.uint8), mpp=0.5) as reader:
    ...     reader.dimensions
    (96, 64)
    """
    if isinstance(source, np.ndarray):
        from marrowseg.io.array import ArrayReader

        return ArrayReader(source, mpp=mpp)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"open_slide takes a path or an ndarray, not {type(source).__name__}")
    path = Path(source)
    try:
        return _open_path(path, mpp)
    except MarrowsegError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a backend let a library error through: name the file
        raise SlideError(f"{path}: cannot open: {type(exc).__name__}: {exc}") from exc


def _open_path(path: Path, mpp: float | None) -> SlideReader:
    from marrowseg.io.openslide import OpenSlideReader, dicom_file_in, openslide_available

    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        if dicom_file_in(path) is not None:
            if not openslide_available():
                raise _needs_openslide(path, "a DICOM folder")
            return OpenSlideReader(path, mpp=mpp)
        raise SlideError(f"{path}: is a directory, not a slide file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise SlideError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if size == 0:
        raise SlideError(f"{path}: empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix in _OPENSLIDE_ONLY:
        if not openslide_available():
            raise _needs_openslide(path, f"a {suffix} slide")
        return OpenSlideReader(path, mpp=mpp)
    fmt = sniff_format(head)
    if fmt == "dicom":
        if not openslide_available():
            raise _needs_openslide(path, "a DICOM file")
        return OpenSlideReader(path, mpp=mpp)
    if fmt == "tiff":
        ifd = _first_ifd_past_end(head, size)
        if ifd is not None:
            raise SlideError(
                f"{path}: corrupt or truncated TIFF: its first image directory is at byte {ifd} but the file has "
                f"{size} bytes (an incomplete copy?)"
            )
        if suffix in _OPENSLIDE_PREFERRED and openslide_available():
            return OpenSlideReader(path, mpp=mpp)
        if _tiff_is_slide(path):
            from marrowseg.io.tiff import TiffReader

            return TiffReader(path, mpp=mpp)
        from marrowseg.io.image import ImageReader

        return ImageReader(path, fmt="tiff", mpp=mpp)
    if fmt in ("png", "jpeg", "bmp"):
        from marrowseg.io.image import ImageReader

        return ImageReader(path, fmt=fmt, mpp=mpp)
    raise UnsupportedFormatError(
        f"{path}: not a recognised slide or image (starts with {head[:8]!r}; "
        "expected TIFF/SVS/NDPI, PNG, JPEG or BMP)"
    )
