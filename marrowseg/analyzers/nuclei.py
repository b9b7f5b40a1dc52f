"""Nuclear detection and morphology classes on a haematoxylin optical-density image.

Pure functions shared by the H&E analyzer and the E-cadherin analyzer (which passes the
haematoxylin counterstain channel). Nothing here sees RGB: the caller deconvolves.

Pipeline (classical detector)::

    peak_map = gaussian(h_od, peak_sigma_um)     # dense: torch, see NucleusMaps
    mask_map = gaussian(h_od, mask_sigma_um)
    centres  = local maxima of peak_map, >= min_peak_od, >= min_distance_um apart, inside mask
    labels   = watershed(-peak_map, centres, mask = mask_map > mask_od)
    table    = per-label centroid, area_um2, eccentricity, solidity, h_od_mean, h_od_cv

The table is the stable interface (column names below); ``classify_nuclei`` turns it into
class names using sizes in µm² from the config.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.measure import regionprops_table
from skimage.segmentation import watershed

__all__ = [
    "NUCLEUS_COLUMNS",
    "NUCLEUS_CLASSES",
    "gaussian_blur_torch",
    "NucleusMaps",
    "detect_nuclei",
    "nuclei_from_centres",
    "classify_nuclei",
    "empty_table",
]

#: columns of the nucleus table, in order; row/col in pixels of the input, float64
NUCLEUS_COLUMNS = ("row", "col", "area_um2", "eccentricity", "solidity", "h_od_mean", "h_od_cv", "label")
#: class names returned by :func:`classify_nuclei`
NUCLEUS_CLASSES = ("late_erythroid", "megakaryocyte", "other")


def empty_table() -> dict[str, np.ndarray]:
    """A nucleus table with no rows and every column of :data:`NUCLEUS_COLUMNS`."""
    out = {c: np.zeros(0, np.float64) for c in NUCLEUS_COLUMNS}
    out["label"] = np.zeros(0, np.int32)
    return out


def _gaussian_kernel_1d(sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return k / k.sum()


def gaussian_blur_torch(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, C, H, W)`` tensor, reflecting at the borders.

    Parameters
    ----------
    x : (B, C, H, W) float tensor
    sigma_px : float
        Standard deviation in pixels; 0 returns ``x`` unchanged.

    Returns
    -------
    (B, C, H, W) tensor of the same dtype.
    """
    if sigma_px <= 0:
        return x
    k = _gaussian_kernel_1d(sigma_px, x.dtype, x.device)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    # reflect padding needs pad < size; fall back to replicate for tiny inputs
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = F.pad(x, (r, r, 0, 0), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode=mode)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class NucleusMaps(torch.nn.Module):
    """Dense step of the classical detector: the two smoothed haematoxylin maps.

    Input ``(B, 1, H, W)`` haematoxylin OD; output ``{"peak": ..., "mask": ...}``, same shape.
    """

    def __init__(self, mpp: float, cfg: Any) -> None:
        super().__init__()
        self.peak_sigma_px = float(cfg.peak_sigma_um) / float(mpp)
        self.mask_sigma_px = float(cfg.mask_sigma_um) / float(mpp)

    def forward(self, h_od: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "peak": gaussian_blur_torch(h_od, self.peak_sigma_px),
            "mask": gaussian_blur_torch(h_od, self.mask_sigma_px),
        }


def _check_image(h_od: np.ndarray, name: str = "h_od") -> np.ndarray:
    a = np.asarray(h_od)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a (H, W) array, got shape {a.shape}")
    return a.astype(np.float32, copy=False)


def _smooth(h_od: np.ndarray, sigma_um: float, mpp: float) -> np.ndarray:
    s = float(sigma_um) / float(mpp)
    return ndi.gaussian_filter(h_od, s, mode="reflect") if s > 0 else h_od


def detect_nuclei(
    h_od: np.ndarray,
    mpp: float,
    cfg: Any,
    *,
    peak_map: np.ndarray | None = None,
    mask_map: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Detect and segment nuclei in a haematoxylin OD image (classical detector).

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin optical density (or concentration), 0 where unstained.
    mpp : float
        Pixel size, µm per pixel (> 0).
    cfg : NucleiConfig
        ``peak_sigma_um``, ``min_distance_um``, ``min_peak_od``, ``mask_sigma_um``,
        ``mask_od``, ``min_area_um2``.
    peak_map, mask_map : (H, W) float32 ndarray, optional
        ``h_od`` smoothed with ``peak_sigma_um`` / ``mask_sigma_um`` (the torch module
        computes them on the device); computed here with scipy when omitted.
    allowed : (H, W) bool ndarray, optional
        Centres outside it are ignored (e.g. only haematopoietic tissue).

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background, 1..N nuclei (label ``table["label"][i]`` is row i).
    table : dict of str to (N,) ndarray
        Columns :data:`NUCLEUS_COLUMNS`; ``row``/``col`` are the region centroid in pixels,
        ``area_um2`` in µm², ``h_od_mean``/``h_od_cv`` of ``h_od`` in the region.
    """
    h_od = _check_image(h_od)
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    peak = _smooth(h_od, cfg.peak_sigma_um, mpp) if peak_map is None else _check_image(peak_map, "peak_map")
    maskm = _smooth(h_od, cfg.mask_sigma_um, mpp) if mask_map is None else _check_image(mask_map, "mask_map")
    if peak.shape != h_od.shape or maskm.shape != h_od.shape:
        raise ValueError(f"peak/mask maps {peak.shape}/{maskm.shape} differ from h_od {h_od.shape}")
    mask = maskm > np.float32(cfg.mask_od)
    min_dist_px = max(1, int(round(float(cfg.min_distance_um) / mpp)))
    search = mask if allowed is None else (mask & allowed)
    if not search.any():
        return np.zeros(h_od.shape, np.int32), empty_table()
    centres = peak_local_max(
        peak,
        min_distance=min_dist_px,
        threshold_abs=float(cfg.min_peak_od),
        labels=search.astype(np.uint8),
        exclude_border=False,
    )
    return nuclei_from_centres(h_od, mpp, centres, peak, mask, min_area_um2=float(cfg.min_area_um2))


def nuclei_from_centres(
    h_od: np.ndarray,
    mpp: float,
    centres: np.ndarray,
    relief: np.ndarray,
    mask: np.ndarray,
    *,
    min_area_um2: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Grow nuclei from given centres by watershed and measure them.

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD, for the density columns.
    mpp : float
        µm per pixel.
    centres : (N, 2) int ndarray
        (row, col) seeds, e.g. peaks of a smoothed map or of a learned centre map.
    relief : (H, W) float ndarray
        Higher inside nuclei; the watershed floods ``-relief``.
    mask : (H, W) bool ndarray
        Nuclear pixels; nuclei never grow outside it.
    min_area_um2 : float
        Smaller regions are dropped (their seeds too), µm².

    Returns
    -------
    labels, table
        As :func:`detect_nuclei`.
    """
    shape = h_od.shape
    if len(centres) == 0:
        return np.zeros(shape, np.int32), empty_table()
    centres = np.asarray(centres, dtype=np.intp).reshape(-1, 2)
    markers = np.zeros(shape, np.int32)
    markers[centres[:, 0], centres[:, 1]] = np.arange(1, len(centres) + 1, dtype=np.int32)
    # a seed outside the mask still gets a minimal region: the mask must include it
    grow = mask.copy()
    grow[centres[:, 0], centres[:, 1]] = True
    labels = watershed(-relief, markers, mask=grow).astype(np.int32)
    px_um2 = float(mpp) ** 2
    props = regionprops_table(
        labels,
        intensity_image=h_od,
        properties=("label", "centroid", "area", "eccentricity", "solidity", "intensity_mean"),
        extra_properties=(_intensity_std,),
    )
    area_um2 = props["area"].astype(np.float64) * px_um2
    keep = area_um2 >= min_area_um2
    mean = props["intensity_mean"].astype(np.float64)
    table = {
        "row": props["centroid-0"].astype(np.float64)[keep],
        "col": props["centroid-1"].astype(np.float64)[keep],
        "area_um2": area_um2[keep],
        "eccentricity": props["eccentricity"].astype(np.float64)[keep],
        "solidity": props["solidity"].astype(np.float64)[keep],
        "h_od_mean": mean[keep],
        "h_od_cv": (props["_intensity_std"].astype(np.float64) / np.maximum(mean, 1e-6))[keep],
        "label": props["label"].astype(np.int32)[keep],
    }
    if not keep.all():
        lut = np.zeros(int(labels.max()) + 1, np.int32)
        lut[table["label"]] = table["label"]
        labels = lut[labels]
    return labels, table


def _intensity_std(region: np.ndarray, intensity: np.ndarray) -> float:
    return float(np.std(intensity[region]))


def classify_nuclei(table: dict[str, np.ndarray], cfg: Any) -> np.ndarray:
    """Morphological class of each nucleus.

    Parameters
    ----------
    table : dict of str to (N,) ndarray
        Output of :func:`detect_nuclei` (needs ``area_um2``, ``eccentricity``,
        ``h_od_mean``, ``h_od_cv``).
    cfg : NucleusClassesConfig
        Size limits in µm², density in OD.

    Returns
    -------
    classes : (N,) object ndarray of str
        ``megakaryocyte`` (very large nucleus), ``late_erythroid`` (small, round, dense,
        homogeneous: polychromatic/orthochromatic normoblast) or ``other``.

    Notes
    -----
    Late normoblast nuclei are 4-6.5 µm across with pyknotic, evenly dark chromatin;
    megakaryocyte nuclei are lobulated and 20-50 µm across. Morphology alone cannot
    separate a late normoblast from a small lymphocyte; the E-cadherin stain can.
    """
    n = len(table["area_um2"])
    out = np.full(n, "other", dtype=object)
    if n == 0:
        return out
    area = np.asarray(table["area_um2"], np.float64)
    late = (
        (area >= cfg.late_erythroid_min_area_um2)
        & (area <= cfg.late_erythroid_max_area_um2)
        & (np.asarray(table["h_od_mean"]) >= cfg.late_erythroid_min_od)
        & (np.asarray(table["eccentricity"]) <= cfg.late_erythroid_max_eccentricity)
        & (np.asarray(table["h_od_cv"]) <= cfg.late_erythroid_max_od_cv)
    )
    out[late] = "late_erythroid"
    out[area >= cfg.megakaryocyte_min_area_um2] = "megakaryocyte"
    return out
