"""Formats tiffslide lacks (MIRAX .mrxs, Hamamatsu .vms/.vmu, Zeiss .czi, Sakura .svslide, Leica .scn,
Ventana .bif, DICOM), through OpenSlide when it is installed.

``openslide`` is imported lazily: without it this module still imports and
:func:`openslide_available` returns False.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from marrowseg.errors import SlideError, UnsupportedFormatError
from marrowseg.io._colour import plan_colour, to_rgb_uint8
from marrowseg.io._mpp import resolve_mpp
from marrowseg.io.base import SlideReader
from marrowseg.io.files import dicom_files

__all__ = ["OpenSlideReader", "openslide_available", "OPENSLIDE_SUFFIXES"]

OPENSLIDE_SUFFIXES = frozenset({".mrxs", ".vms", ".vmu", ".czi", ".svslide", ".scn", ".bif"})
"""Suffixes read with OpenSlide when it is available."""


def _import_openslide() -> Any:
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the Python package without its C library
        return None
    return openslide


def openslide_available() -> bool:
    """True when ``openslide`` (and its C library) can be imported."""
    return _import_openslide() is not None


def dicom_file_in(folder: Path) -> Path | None:
    """The first ``.dcm`` file of a DICOM WSI folder, or None."""
    files = dicom_files(folder)
    return files[0] if files else None


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide.

    Parameters
    ----------
    path : Path
        The slide file, or a DICOM folder.
    mpp : float, optional
        Level-0 pixel size override, µm per pixel.
    """

    backend = "openslide"

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        super().__init__(path=path, name=path.name)
        self._target = path
        if path.is_dir():
            dcm = dicom_file_in(path)
            if dcm is None:
                raise SlideError(f"{path}: is a directory without .dcm files, not a slide")
            self._target = dcm  # OpenSlide opens one file and finds the rest of the series beside it
        handle = self._open_handle()
        try:
            props = {str(k): v for k, v in handle.properties.items()}
            level_dims = [tuple(map(int, d)) for d in handle.level_dimensions]
        except Exception as exc:
            handle.close()
            raise SlideError(
                f"{path}: cannot read slide metadata: {type(exc).__name__}: {exc}"
            ) from exc
        self._props = props
        try:
            self._set_levels(level_dims)
            mx, my = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
            candidate = ("openslide", float(mx), float(my)) if mx and my else None
            self.mpp, self.mpp_source = resolve_mpp(str(path), mpp, [candidate])
        except BaseException:
            handle.close()
            raise
        self.vendor = props.get("openslide.vendor")
        self._plan = plan_colour(str(path), np.uint8, 4)
        self._handle, self._handle_pid = handle, os.getpid()

    def _open_handle(self) -> Any:
        openslide = _import_openslide()
        if openslide is None:
            raise UnsupportedFormatError(
                f"{self.path}: needs OpenSlide, which is not installed "
                "(pip install 'marrowseg[openslide]')"
            )
        try:
            return openslide.OpenSlide(str(self._target))
        except Exception as exc:
            raise UnsupportedFormatError(
                f"{self.path}: OpenSlide cannot open it: {type(exc).__name__}: {exc}"
            ) from exc

    def _close_handle(self, handle: Any) -> None:
        handle.close()

    def _read_level(
        self, handle: Any, level: int, x0: int, y0: int, x1: int, y1: int
    ) -> np.ndarray:
        d_x, d_y = self._level_ds[level]
        location = (round(x0 * d_x), round(y0 * d_y))  # OpenSlide takes level-0 coordinates
        image = handle.read_region(location, level, (x1 - x0, y1 - y0))
        rgba = np.asarray(image.convert("RGBA"))
        return to_rgb_uint8(rgba, self._plan)

    def _load_properties(self) -> dict[str, Any]:
        return dict(self._props)
