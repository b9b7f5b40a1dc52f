"""An in-memory array as a one-level virtual slide (phantoms, tests)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from marrowseg.errors import MissingMppError, SlideError
from marrowseg.io._colour import plan_colour, to_rgb_uint8
from marrowseg.io._mpp import resolve_mpp
from marrowseg.io.base import SlideReader

__all__ = ["ArrayReader"]

ARRAY_LABEL = "<array>"


def _as_yxc(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        return arr
    raise SlideError(f"{ARRAY_LABEL}: expected a (H, W) or (H, W, C) array, got shape {arr.shape}")


class ArrayReader(SlideReader):
    """A (H, W[, C]) array read as a one-level slide.

    Parameters
    ----------
    array : (H, W) or (H, W, C) ndarray
        C in 1..4 (grey, grey+alpha, RGB, RGBA); any integer or float dtype
        (floats in [0, 1], or [0, 255] when the maximum exceeds 1).
    mpp : float
        Pixel size, µm per pixel (required: an array carries no metadata).

    Notes
    -----
    An RGB uint8 array is used without a copy; anything else is converted to
    RGB uint8 once, here.
    """

    backend = "array"

    def __init__(self, array: np.ndarray, *, mpp: float | None) -> None:
        super().__init__(path=None, name=ARRAY_LABEL)
        if mpp is None:
            raise MissingMppError(f"{ARRAY_LABEL}: an array has no pixel size metadata; pass mpp=")
        self.mpp, self.mpp_source = resolve_mpp(ARRAY_LABEL, mpp, [])
        source = _as_yxc(np.asarray(array))
        self._set_levels([(source.shape[1], source.shape[0])])
        value_max = None
        if np.issubdtype(source.dtype, np.floating):
            finite_max = float(np.nanmax(source)) if source.size else 0.0
            value_max = 255.0 if finite_max > 1.0 else 1.0
        plan = plan_colour(ARRAY_LABEL, source.dtype, source.shape[2], value_max=value_max)
        rgb = to_rgb_uint8(source, plan).view()
        rgb.flags.writeable = False  # a read-only view; the caller's array is untouched
        self._source = source
        self._rgb = rgb
        self._nbytes = source.nbytes
        self._dtype = source.dtype.name
        self._log_conversion(plan.describe())

    def _open_handle(self) -> np.ndarray:
        return self._rgb

    def _read_level(
        self, handle: np.ndarray, level: int, x0: int, y0: int, x1: int, y1: int
    ) -> np.ndarray:
        return handle[y0:y1, x0:x1]

    def _load_properties(self) -> dict[str, Any]:
        h, w = self.shape
        return {"array.dtype": self._dtype, "array.width": w, "array.height": h}

    def _content_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self._source).data).hexdigest()

    def _size_bytes(self) -> int:
        return self._nbytes

    def _prepare_pickle(self) -> None:
        if self._sha256 is None:
            self._sha256 = self._content_sha256()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_source"] = None  # the hash is computed; don't ship the data twice
        return state
