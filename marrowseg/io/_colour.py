"""Conversion of decoded pixels (grey, RGBA, 16-bit, float) to RGB uint8.

The conversion is decided once per slide (a :class:`ColourPlan`) so that every
window of a slide is mapped the same way, whatever its content.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marrowseg.errors import UnsupportedFormatError

__all__ = ["ColourPlan", "plan_colour", "to_rgb_uint8"]


@dataclass(frozen=True)
class ColourPlan:
    """How to map one slide's samples to RGB uint8.

    Attributes
    ----------
    n_channels : int
        Samples per pixel: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA.
    value_max : float
        Sample value mapped to 255 (255 for uint8, 65535 for uint16, 1.0 for float in [0, 1]).
    dtype : str
        Source dtype name.
    """

    n_channels: int
    value_max: float
    dtype: str

    @property
    def is_identity(self) -> bool:
        """True when the samples already are RGB uint8."""
        return self.n_channels == 3 and self.dtype == "uint8"

    def describe(self) -> str:
        """One line saying what is converted, for the per-slide log."""
        parts = []
        if self.n_channels == 1:
            parts.append("greyscale replicated to RGB")
        elif self.n_channels == 2:
            parts.append("greyscale+alpha composited over white")
        elif self.n_channels == 4:
            parts.append("RGBA composited over white")
        if self.dtype != "uint8":
            parts.append(f"{self.dtype} scaled from [0, {self.value_max:g}] to uint8")
        return "; ".join(parts) or "none"


def plan_colour(
    label: str, dtype: np.dtype, n_channels: int, *, value_max: float | None = None
) -> ColourPlan:
    """Decide the RGB uint8 conversion for a slide.

    Parameters
    ----------
    label : str
        The slide's path for error messages.
    dtype : numpy dtype
        Sample type as decoded.
    n_channels : int
        Samples per pixel (1..4).
    value_max : float, optional
        Sample value that maps to 255. Default: the dtype's maximum for
        integers, 1.0 for floats.

    Returns
    -------
    plan : ColourPlan

    Raises
    ------
    UnsupportedFormatError
        More than 4 channels, or a complex/object dtype.
    """
    dtype = np.dtype(dtype)
    if n_channels not in (1, 2, 3, 4):
        raise UnsupportedFormatError(
            f"{label}: {n_channels} samples per pixel; expected grey, RGB or RGBA"
        )
    if dtype == np.bool_:
        vmax = 1.0
    elif np.issubdtype(dtype, np.integer):
        vmax = float(np.iinfo(dtype).max)
    elif np.issubdtype(dtype, np.floating):
        vmax = 1.0
    else:
        raise UnsupportedFormatError(f"{label}: pixel type {dtype} is not an image type")
    if value_max is not None:
        vmax = float(value_max)
    return ColourPlan(n_channels=n_channels, value_max=vmax, dtype=dtype.name)


def to_rgb_uint8(arr: np.ndarray, plan: ColourPlan) -> np.ndarray:
    """Map decoded samples to RGB uint8 following ``plan``.

    Parameters
    ----------
    arr : (H, W) or (H, W, C) ndarray
        Decoded samples, C == ``plan.n_channels``.
    plan : ColourPlan

    Returns
    -------
    rgb : (H, W, 3) uint8 ndarray
        Alpha composited over white; values clipped to [0, 255].
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if plan.is_identity:
        return np.ascontiguousarray(arr)
    if plan.dtype == "uint8":
        values = arr
        scale = None
    else:
        values = arr.astype(np.float32)
        scale = np.float32(255.0 / plan.value_max)
    n = arr.shape[2]
    colour = values[:, :, : (1 if n <= 2 else 3)]
    if scale is not None:
        colour = np.clip(colour * scale, 0, 255)
    if n in (2, 4):
        alpha = values[:, :, n - 1 : n].astype(np.float32) * np.float32(1.0 / plan.value_max)
        alpha = np.clip(alpha, 0, 1)
        colour = colour * alpha + np.float32(255.0) * (1 - alpha)
    if colour.dtype != np.uint8:
        colour = np.rint(colour).astype(np.uint8)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour)
