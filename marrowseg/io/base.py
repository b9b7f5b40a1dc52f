"""The slide reader interface and the resampling logic every backend shares.

A backend supplies the level geometry, the metadata and ``_read_level`` (an
in-bounds window of one level as RGB uint8); :class:`SlideReader` turns that
into windows at any pixel size, thumbnails, identity and pickling.
"""

from __future__ import annotations

import abc
import logging
import math
import operator
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from marrowseg.errors import MarrowsegError, SlideError
from marrowseg.io import _resample
from marrowseg.io.files import files_sha256, files_size, files_stamp, slide_files

__all__ = ["SlideReader", "LEVEL_WINDOW_MAX_PX", "READ_AT_MPP_MAX_PX", "LEVEL_TOL"]

logger = logging.getLogger(__name__)

LEVEL_WINDOW_MAX_PX = 32 * 2**20
"""Largest level window (pixels) read at once; bigger reads go in blocks."""
READ_AT_MPP_MAX_PX = 64 * 2**20
"""Largest whole-slide image :meth:`SlideReader.read_at_mpp` returns."""
LEVEL_TOL = 1e-3
"""Relative tolerance when matching a level's downsample to the requested scale."""
_BLOCK_MAX_SIDE_PX = 8192


def level_downsamples_xy(level_dims: list[tuple[int, int]]) -> list[tuple[float, float]]:
    """Per-axis downsample of each level relative to level 0.

    A level whose size is level 0 divided by an integer k, rounded either way,
    gets exactly (k, k): pyramids store ceil(w / 2**n) pixels at downsample 2**n.

    Parameters
    ----------
    level_dims : list of (width, height)

    Returns
    -------
    downsamples : list of (d_x, d_y)
    """
    w0, h0 = level_dims[0]
    out = []
    for w, h in level_dims:
        r_x, r_y = w0 / w, h0 / h
        k = round((r_x + r_y) / 2)
        if k >= 1 and w in (w0 // k, -(-w0 // k)) and h in (h0 // k, -(-h0 // k)):
            out.append((float(k), float(k)))
        else:
            out.append((r_x, r_y))
    return out


class SlideReader(abc.ABC):
    """A whole-slide image: a pyramid of levels with a known pixel size.

    Open one with :func:`marrowseg.io.open_slide`. Readers are picklable; the
    copy reopens its file on first use (also after a fork).

    Attributes
    ----------
    path : Path or None
        The file (None for an array).
    name : str
        File name, or '<array>'.
    mpp : float
        Level-0 pixel size, µm per pixel.
    mpp_source : str
        Where ``mpp`` came from: 'flag', 'aperio', 'ome', 'tiff-resolution', ...
    vendor : str or None
        Scanner vendor or format family ('aperio', 'hamamatsu', 'ome', ...).
    """

    backend: str = "base"

    path: Path | None
    name: str
    mpp: float
    mpp_source: str
    vendor: str | None

    def __init__(self, path: Path | None, name: str) -> None:
        self.path = path
        self.name = name
        self.vendor = None
        self._level_dims: list[tuple[int, int]] = []
        self._level_ds: list[tuple[float, float]] = []
        self._handle: Any = None
        self._handle_pid: int | None = None
        self._closed = False
        self._sha256: str | None = None
        # every file the slide is made of (a DICOM folder's .dcm files, a MIRAX index and its data)
        self._file_stamp: tuple[tuple[str, int, int], ...] | None = None
        if path is not None and (path.is_file() or path.is_dir()):
            self._file_stamp = files_stamp(slide_files(path))

    # ------------------------------------------------------------------ backend hooks
    @abc.abstractmethod
    def _open_handle(self) -> Any:
        """Open the file (or decoder) and return the handle ``_read_level`` uses."""

    def _close_handle(self, handle: Any) -> None:  # noqa: B027 - optional hook
        """Release a handle from ``_open_handle``."""

    @abc.abstractmethod
    def _read_level(
        self, handle: Any, level: int, x0: int, y0: int, x1: int, y1: int
    ) -> np.ndarray:
        """Level pixels ``[y0:y1, x0:x1]`` (in bounds, non-empty) as (h, w, 3) uint8 RGB."""

    @abc.abstractmethod
    def _load_properties(self) -> dict[str, Any]:
        """All metadata as a flat dict."""

    # ------------------------------------------------------------------ setup helpers
    def _set_levels(self, level_dims: list[tuple[int, int]]) -> None:
        dims = [(int(w), int(h)) for w, h in level_dims]
        if not dims or any(w <= 0 or h <= 0 for w, h in dims):
            raise SlideError(f"{self._label}: zero-size image (levels {dims})")
        self._level_dims = dims
        self._level_ds = level_downsamples_xy(dims)

    @property
    def _label(self) -> str:
        return str(self.path) if self.path is not None else self.name

    def _log_conversion(self, note: str) -> None:
        if note != "none":
            logger.info("%r: colour converted: %s", self, note)

    # ------------------------------------------------------------------ resource handling
    def _get_handle(self) -> Any:
        if self._closed:
            raise SlideError(f"{self._label}: reader is closed")
        pid = os.getpid()
        if self._handle is None or self._handle_pid != pid:
            self._check_unchanged()
            self._handle = self._open_handle()
            self._handle_pid = pid
        return self._handle

    def _check_unchanged(self) -> None:
        if self._file_stamp is None or self.path is None:
            return
        try:
            stamp = files_stamp(slide_files(self.path))
        except OSError as exc:
            raise SlideError(f"{self.path}: cannot reopen: {exc.strerror or exc}") from exc
        if stamp != self._file_stamp:
            raise SlideError(f"{self.path}: file changed on disk since it was opened")

    def close(self) -> None:
        """Release the file handle; later reads raise :class:`SlideError`."""
        handle, self._handle = self._handle, None
        if handle is not None and self._handle_pid == os.getpid():
            self._close_handle(handle)
        self._closed = True

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        self._prepare_pickle()
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _prepare_pickle(self) -> None:  # noqa: B027 - optional hook
        """Compute anything the copy cannot recompute (called before pickling)."""

    def __repr__(self) -> str:
        w, h = self.dimensions if self._level_dims else (0, 0)
        mpp = getattr(self, "mpp", float("nan"))
        return (
            f"{type(self).__name__}({self._label!r}, {w}x{h} px, "
            f"mpp={mpp:.4g}, levels={len(self._level_dims)})"
        )

    # ------------------------------------------------------------------ geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size as (width, height), px."""
        return self._level_dims[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 size as (rows, cols) = (height, width), px."""
        w, h = self._level_dims[0]
        return (h, w)

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self._level_dims)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of each level, px."""
        return list(self._level_dims)

    @property
    def level_downsamples(self) -> list[float]:
        """Downsample of each level relative to level 0 (mean of x and y)."""
        return [(d_x + d_y) / 2.0 for d_x, d_y in self._level_ds]

    @cached_property
    def properties(self) -> dict[str, Any]:
        """Backend metadata (read once)."""
        return self._load_properties()

    def best_level(self, scale: float) -> int:
        """Coarsest level whose downsample is <= ``scale`` (level-0 px per target px).

        Parameters
        ----------
        scale : float
            Target pixel size / level-0 pixel size.

        Returns
        -------
        level : int
        """
        best = 0
        for level, (d_x, d_y) in enumerate(self._level_ds):
            if max(d_x, d_y) <= scale * (1 + LEVEL_TOL) and max(d_x, d_y) >= max(
                *self._level_ds[best]
            ):
                best = level
        return best

    # ------------------------------------------------------------------ reading
    def read_region(self, x_px: int, y_px: int, w_px: int, h_px: int, mpp: float) -> np.ndarray:
        """A window of the slide resampled to ``mpp``.

        Parameters
        ----------
        x_px, y_px : int
            Column and row of the window's top-left pixel in the slide's grid
            at ``mpp`` (origin: slide top-left; may be negative).
        w_px, h_px : int
            Window width and height, px at ``mpp`` (>= 0).
        mpp : float
            Target pixel size, µm per pixel (> 0). Smaller than :attr:`mpp`
            upsamples (bilinear).

        Returns
        -------
        rgb : (h_px, w_px, 3) uint8 ndarray
            The window; pixels whose footprint lies wholly outside the slide
            are 255 (a pixel straddling the edge repeats the edge pixels).

        Raises
        ------
        SlideError
            The file cannot be decoded there, or the reader is closed.
        ValueError
            Negative size or non-positive ``mpp``.
        TypeError
            A position or size that is not an integer.

        Notes
        -----
        Target pixel ``(r, c)`` covers level-0 ``[c*s, (c+1)*s)`` with
        ``s = mpp / self.mpp``. The coarsest level with downsample <= s is
        read (window plus margin only). An integer factor aligned to level
        pixels is an exact block mean; otherwise a Gaussian pre-blur
        (sigma = 0.4 factor) and bilinear sampling at the exact centres. The
        value of a target pixel does not depend on the window it is read in.
        """
        x_px, y_px, w_px, h_px = map(operator.index, (x_px, y_px, w_px, h_px))
        if w_px < 0 or h_px < 0:
            raise ValueError(f"{self._label}: negative window size w={w_px}, h={h_px}")
        mpp = float(mpp)
        if not math.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"{self._label}: target mpp must be finite and > 0, got {mpp!r}")
        out = np.full((h_px, w_px, 3), 255, dtype=np.uint8)
        if w_px == 0 or h_px == 0:
            return out
        scale = mpp / self.mpp
        level = self.best_level(scale)
        d_x, d_y = self._level_ds[level]
        f_x, f_y = scale / d_x, scale / d_y
        w0, h0 = self.dimensions
        # Target pixels whose footprint starts inside the slide: 0 <= c < w0 / scale.
        c0, c1 = max(x_px, 0), min(x_px + w_px, math.ceil(w0 / scale - 1e-9))
        r0, r1 = max(y_px, 0), min(y_px + h_px, math.ceil(h0 / scale - 1e-9))
        if c0 >= c1 or r0 >= r1:
            return out
        for br0, br1, bc0, bc1 in self._blocks(r0, r1, c0, c1, f_x, f_y):
            out[br0 - y_px : br1 - y_px, bc0 - x_px : bc1 - x_px] = self._resample_block(
                level, f_x, f_y, bc0, br0, bc1 - bc0, br1 - br0
            )
        return out

    @staticmethod
    def _blocks(r0: int, r1: int, c0: int, c1: int, f_x: float, f_y: float):
        """Split target rows/cols so each level window stays under LEVEL_WINDOW_MAX_PX."""
        pad = 2 * _resample.margin_px(f_x, f_y) + 1  # margins plus rounding out to whole pixels
        w, h = c1 - c0, r1 - r0
        budget = LEVEL_WINDOW_MAX_PX
        if (w * f_x + pad) * (h * f_y + pad) <= budget and max(w, h) <= _BLOCK_MAX_SIDE_PX:
            yield r0, r1, c0, c1
            return
        bw = min(w, _BLOCK_MAX_SIDE_PX, max(1, int((budget**0.5 - pad) / f_x)))
        bh = min(h, _BLOCK_MAX_SIDE_PX, max(1, int((budget / (bw * f_x + pad) - pad) / f_y)))
        for br in range(r0, r1, bh):
            for bc in range(c0, c1, bw):
                yield br, min(br + bh, r1), bc, min(bc + bw, c1)

    def _resample_block(
        self, level: int, f_x: float, f_y: float, c0: int, r0: int, w: int, h: int
    ) -> np.ndarray:
        k = _resample.integer_factor(f_x, f_y)
        if k is not None:
            window = self._read_padded(level, c0 * k, r0 * k, (c0 + w) * k, (r0 + h) * k)
            return _resample.area_reduce(window, k)
        m = _resample.margin_px(f_x, f_y)
        lx0 = math.floor(c0 * f_x) - m
        ly0 = math.floor(r0 * f_y) - m
        lx1 = math.ceil((c0 + w) * f_x) + m
        ly1 = math.ceil((r0 + h) * f_y) + m
        window = self._read_padded(level, lx0, ly0, lx1, ly1)
        return _resample.linear_resample(window, f_x, f_y, (lx0, ly0), (c0, r0), (h, w))

    def _read_padded(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level pixels [y0:y1, x0:x1]; outside the level the edge pixels are repeated.

        Repeating the edge (rather than white) keeps interpolation and blur from
        bleeding white into pixels inside the slide; pixels wholly outside the
        slide are set to white by :meth:`read_region` itself.
        """
        lw, lh = self._level_dims[level]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        if cx0 >= cx1 or cy0 >= cy1:
            return np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        inner = self._read_level_checked(level, cx0, cy0, cx1, cy1)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            return inner
        return cv2.copyMakeBorder(
            inner, cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1, borderType=cv2.BORDER_REPLICATE
        )

    def _read_level_checked(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        handle = self._get_handle()
        try:
            data = self._read_level(handle, level, x0, y0, x1, y1)
        except MarrowsegError:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{self._label}: cannot decode region x={x0},y={y0},w={x1 - x0},h={y1 - y0} "
                f"at level {level}: {type(exc).__name__}: {exc}"
            ) from exc
        if data.shape != (y1 - y0, x1 - x0, 3) or data.dtype != np.uint8:
            raise SlideError(
                f"{self._label}: level {level} returned shape {data.shape} {data.dtype} "
                f"for a {x1 - x0}x{y1 - y0} px window"
            )
        return data

    def read_region_or_blank(
        self, x_px: int, y_px: int, w_px: int, h_px: int, mpp: float, *, block_px: int = 256
    ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """:meth:`read_region`, with the parts that cannot be decoded left white.

        For pictures of a whole slide (the tissue overview, overlays), where one corrupt
        chunk of the file must not cost the rest: the window is read whole, and only if that
        fails, again in blocks.

        Parameters
        ----------
        x_px, y_px, w_px, h_px, mpp
            As :meth:`read_region`.
        block_px : int
            Side of the blocks read after a failure, px at ``mpp``.

        Returns
        -------
        rgb : (h_px, w_px, 3) uint8 ndarray
        unreadable : (h_px, w_px) bool ndarray or None
            The pixels of blocks that failed (white in ``rgb``); None when all was read.
        reasons : list of str
            Each distinct failure message once.
        """
        try:
            return self.read_region(x_px, y_px, w_px, h_px, mpp), None, []
        except SlideError:
            pass
        rgb = np.full((h_px, w_px, 3), 255, np.uint8)
        bad = np.zeros((h_px, w_px), bool)
        reasons: dict[str, None] = {}  # neighbouring blocks share a chunk: each reason once
        for r in range(0, h_px, block_px):
            for c in range(0, w_px, block_px):
                bh, bw = min(block_px, h_px - r), min(block_px, w_px - c)
                try:
                    rgb[r : r + bh, c : c + bw] = self.read_region(x_px + c, y_px + r, bw, bh, mpp)
                except SlideError as exc:
                    bad[r : r + bh, c : c + bw] = True
                    reasons[str(exc)] = None
        return rgb, bad, list(reasons)

    def thumbnail(self, max_px: int, *, blank_unreadable: bool = False) -> np.ndarray:
        """The whole slide, longest side at most ``max_px``, aspect kept.

        Parameters
        ----------
        max_px : int
            Longest side of the result, px (>= 1). A slide smaller than that is
            returned at level-0 size (never upsampled).
        blank_unreadable : bool
            Leave parts that cannot be decoded white (:meth:`read_region_or_blank`)
            instead of raising.

        Returns
        -------
        rgb : (H, W, 3) uint8 ndarray
            Read from the smallest level that still has enough pixels.
        """
        max_px = int(max_px)
        if max_px < 1:
            raise ValueError(f"{self._label}: max_px must be >= 1, got {max_px}")
        w0, h0 = self.dimensions
        scale = max(max(w0, h0) / max_px, 1.0)
        w = min(max_px, max(1, round(w0 / scale)))
        h = min(max_px, max(1, round(h0 / scale)))
        if blank_unreadable:
            return self.read_region_or_blank(0, 0, w, h, self.mpp * scale, block_px=32)[0]
        return self.read_region(0, 0, w, h, self.mpp * scale)

    def read_at_mpp(self, mpp: float) -> np.ndarray:
        """The whole slide at a (coarse) pixel size.

        Parameters
        ----------
        mpp : float
            Target pixel size, µm per pixel.

        Returns
        -------
        rgb : (ceil(H * s0 / mpp), ceil(W * s0 / mpp), 3) uint8 ndarray
            ``s0`` is :attr:`mpp`; a last partial pixel is blended with white.

        Raises
        ------
        SlideError
            The result would exceed 64 Mpx.
        """
        mpp = float(mpp)
        if not math.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"{self._label}: target mpp must be finite and > 0, got {mpp!r}")
        scale = mpp / self.mpp
        w0, h0 = self.dimensions
        w, h = math.ceil(w0 / scale - 1e-9), math.ceil(h0 / scale - 1e-9)
        if w * h > READ_AT_MPP_MAX_PX:
            raise SlideError(
                f"{self._label}: whole slide at {mpp:g} µm/px would be {w}x{h} px "
                f"(> {READ_AT_MPP_MAX_PX // 2**20} Mpx); use a coarser mpp or read_region"
            )
        return self.read_region(0, 0, w, h, mpp)

    # ------------------------------------------------------------------ identity
    def _content_sha256(self) -> str:
        assert self.path is not None
        try:
            return files_sha256(slide_files(self.path))
        except OSError as exc:
            raise SlideError(
                f"{self.path}: cannot read for hashing: {exc.strerror or exc}"
            ) from exc

    def _size_bytes(self) -> int:
        assert self.path is not None
        return files_size(slide_files(self.path))

    def identity(self) -> dict[str, Any]:
        """Provenance record of the slide.

        Returns
        -------
        identity : dict
            path (absolute str or None), name, size_bytes, sha256 (of the file,
            cached), width, height (px), mpp (µm/px), mpp_source, vendor, levels.
        """
        if self._sha256 is None:
            self._sha256 = self._content_sha256()
        w, h = self.dimensions
        return {
            "path": str(self.path.resolve()) if self.path is not None else None,
            "name": self.name,
            "size_bytes": self._size_bytes(),
            "sha256": self._sha256,
            "width": w,
            "height": h,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "vendor": self.vendor,
            "levels": self.level_count,
        }
