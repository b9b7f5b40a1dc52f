"""Dense maps of the nuclear counterstain (torch on the batch, NumPy references) and the nuclear mask."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from marrowseg.analyzers import filters

__all__ = ["gaussian_blur_torch", "background_factor", "upsample_background", "NucleusMaps", "gaussian_reference", "reference_maps", "nuclear_mask", "fill_holes"]


def gaussian_blur_torch(x: torch.Tensor, sigma_px: float, *, coarse_above_px: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, C, H, W)`` tensor, reflecting at the borders.

    Parameters
    ----------
    x : (B, C, H, W) float tensor
    sigma_px : float
        Standard deviation in pixels; 0 returns ``x`` unchanged. The kernel is truncated
        at ``ceil(3 sigma)``.
    coarse_above_px : float, optional
        For ``sigma_px`` above this, blur at a coarser grid: average-pool by an integer
        factor ``f`` (so the remaining sigma is about ``coarse_above_px``), blur there and
        upsample bilinearly. Use it only where a smooth approximation is fine (context maps).

    Returns
    -------
    (B, C, H, W) tensor of the same dtype.

    Notes
    -----
    Torch ``reflect`` mirrors about the edge pixel (scipy ``mode="mirror"``), unlike scipy's
    default ``reflect`` (about the pixel edge).
    """
    if sigma_px <= 0:
        return x
    if coarse_above_px is not None and sigma_px > coarse_above_px:
        f = int(sigma_px // coarse_above_px)
        h, w = x.shape[-2:]
        if f >= 2 and min(h, w) >= 4 * f:
            small = F.avg_pool2d(x, f, ceil_mode=True, count_include_pad=False)
            # box of width f adds (f^2 - 1) / 12 of variance in coarse... fine-pixel units
            rest = math.sqrt(max(sigma_px**2 - (f * f - 1) / 12.0, 0.25)) / f
            small = gaussian_blur_torch(small, rest)
            up = F.interpolate(small, scale_factor=float(f), mode="bilinear", align_corners=False)
            return up[..., :h, :w].contiguous()
    return filters.gaussian_blur(x, sigma_px)


def _background_sigma_px(mpp: float, cfg: Any) -> float | None:
    """Sigma of the local-background map in pixels, or None when the contrast test is off."""
    if getattr(cfg, "mask_contrast_od", None) is None:
        return None
    return float(cfg.mask_background_sigma_um) / float(mpp)


def background_factor(sigma_px: float) -> int:
    """Block size of the coarse grid the background map is computed on (sigma >= 4 coarse px).

    Why coarse: the map is smooth on the scale of several cells; a full-resolution blur of
    sigma 16 px costs about 1 s per 2048² tile on the CPU, the same blur on 4 x 4 block means
    a sixteenth of it. The blocks add (f² - 1) / 12 px² to the variance: 1.25 px² against
    256 px² for he.yaml's 8 µm at 0.5 µm/px.
    """
    return max(1, int(sigma_px // 4))


def upsample_background(background: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """The coarse background map of :class:`NucleusMaps` / :func:`reference_maps` on the full grid.

    Parameters
    ----------
    background : (ceil(H/f), ceil(W/f)) float32 ndarray
        Block-mean-then-blurred haematoxylin, f = :func:`background_factor` (``sigma_px``).
    shape : (H, W)
        The full-resolution tile shape.
    sigma_px : float
        The background sigma in full-resolution pixels.

    Returns
    -------
    (H, W) float32 ndarray
        Bilinear (cv2, pixel centres aligned: coarse pixel i is centred on fine (i + 0.5) f - 0.5).
    """
    f = background_factor(sigma_px)
    bg = np.asarray(background, np.float32)
    if f == 1:
        return bg
    up = cv2.resize(bg, (bg.shape[1] * f, bg.shape[0] * f), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(up[: shape[0], : shape[1]])


def _coarse_blur_reference(h_od: np.ndarray, sigma_px: float) -> np.ndarray:
    """SciPy twin of the module's coarse background: edge-padded f x f block means, then blurred."""
    f = background_factor(sigma_px)
    img = np.asarray(h_od, np.float32)
    if f > 1:
        h, w = img.shape
        img = np.pad(img, [(0, (-h) % f), (0, (-w) % f)], mode="edge")
        img = img.reshape(img.shape[0] // f, f, img.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)
    return gaussian_reference(img, sigma_px / f)


class NucleusMaps(torch.nn.Module):
    """Dense step of the classical detector: the smoothed haematoxylin maps.

    Input ``(B, 1, H, W)`` haematoxylin OD; output ``{"peak": ..., "mask": ...}``, same shape,
    and ``"background"`` (``h_od`` smoothed with ``mask_background_sigma_um``, on the coarse grid
    of :func:`background_factor`; :func:`upsample_background` brings it back) when
    ``mask_contrast_od`` is set.
    """

    def __init__(self, mpp: float, cfg: Any) -> None:
        super().__init__()
        self.peak_sigma_px = float(cfg.peak_sigma_um) / float(mpp)
        self.mask_sigma_px = float(cfg.mask_sigma_um) / float(mpp)
        self.background_sigma_px = _background_sigma_px(mpp, cfg)

    def forward(self, h_od: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {
            "peak": gaussian_blur_torch(h_od, self.peak_sigma_px),
            "mask": gaussian_blur_torch(h_od, self.mask_sigma_px),
        }
        if self.background_sigma_px is not None:
            f = background_factor(self.background_sigma_px)
            x = h_od
            if f > 1:
                h, w = x.shape[-2:]
                x = F.avg_pool2d(F.pad(x, (0, (-w) % f, 0, (-h) % f), mode="replicate"), f)
            out["background"] = gaussian_blur_torch(x, self.background_sigma_px / f)
        return out


def gaussian_reference(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """:func:`gaussian_blur_torch` in SciPy: ``mode="mirror"``, radius ``ceil(3 sigma)``, float32."""
    img = np.asarray(img, np.float32)
    if sigma_px <= 0:
        return img
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    return ndi.gaussian_filter(img, float(sigma_px), mode="mirror", radius=radius).astype(np.float32, copy=False)


def reference_maps(h_od: np.ndarray, mpp: float, cfg: Any) -> dict[str, np.ndarray]:
    """:class:`NucleusMaps` for one (H, W) image in SciPy: the same keys, (H, W) float32 arrays."""
    out = {
        "peak": gaussian_reference(h_od, float(cfg.peak_sigma_um) / float(mpp)),
        "mask": gaussian_reference(h_od, float(cfg.mask_sigma_um) / float(mpp)),
    }
    bg_sigma_px = _background_sigma_px(mpp, cfg)
    if bg_sigma_px is not None:
        out["background"] = _coarse_blur_reference(h_od, bg_sigma_px)
    return out


def _check_image(h_od: np.ndarray, name: str = "h_od") -> np.ndarray:
    a = np.asarray(h_od)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a (H, W) array, got shape {a.shape}")
    return a.astype(np.float32, copy=False)


def _smooth(h_od: np.ndarray, sigma_um: float, mpp: float) -> np.ndarray:
    s = float(sigma_um) / float(mpp)
    return ndi.gaussian_filter(h_od, s, mode="reflect") if s > 0 else h_od


def nuclear_mask(
    h_od: np.ndarray, mpp: float, cfg: Any, mask_map: np.ndarray, background_map: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear pixels: above ``mask_od`` and, optionally, above their surroundings, small holes filled.

    Parameters
    ----------
    h_od : (H, W) float32 ndarray
        Haematoxylin OD (for the background map when ``background_map`` is omitted).
    mpp : float
        µm per pixel.
    cfg : NucleiConfig
        ``mask_od``; ``mask_contrast_od`` (null: no contrast test) and ``mask_background_sigma_um``;
        ``mask_fill_holes_um2`` (null: no filling).
    mask_map : (H, W) float32 ndarray
        ``h_od`` smoothed with ``mask_sigma_um``.
    background_map : (H, W) float32 ndarray, optional
        ``h_od`` smoothed with ``mask_background_sigma_um`` on the full grid (the module's
        coarse map through :func:`upsample_background`); computed so with scipy when omitted.

    Returns
    -------
    mask : (H, W) bool ndarray
        Nuclear pixels (both tests, holes up to ``mask_fill_holes_um2`` filled).
    filled : (H, W) bool ndarray
        ``mask`` with all its holes filled when the contrast test is on (else ``mask``): the
        mask the megakaryocyte merge looks at.

    Notes
    -----
    Why a contrast test: the haematoxylin OD of cytoplasm and stroma depends on the lab and
    the section (MoNuSeg tiles: non-nuclear median 0.11-0.29 OD, 10-48 % of it above 0.3),
    so an absolute threshold alone takes dark cytoplasm for nuclei and lets nuclear regions
    run into it. A nucleus is denser than its surroundings on the scale of a few cells;
    ``mask_background_sigma_um`` is that scale. A nucleus much wider than that scale (a
    megakaryocyte) reads as its own background inside and fails the test there, while its rim
    passes; so the megakaryocyte merge looks at ``filled``, the mask with its holes filled
    (not at the absolute threshold: in a heavily stained section that is one sheet, and the
    merge would join every nucleus in it). The edge of a dark sheet against pale tissue passes
    the contrast test too.

    Why small holes are filled: a nucleus is one solid body, but the pale nucleoplasm of an
    open-chromatin (vesicular) nucleus can fall below either threshold. A region with a hole
    has a low solidity and a ring of distance-to-edge maxima, so :func:`split_by_shape` cuts
    one nucleus into pieces at "waists" that are only the hole (on mbm-dev this is the whole
    effect: without the split, filling changes nothing). Holes larger than
    ``mask_fill_holes_um2`` are gaps between cells (a ring of erythroblasts round a
    macrophage) and stay open.
    """
    mask = mask_map > np.float32(cfg.mask_od)
    contrast = getattr(cfg, "mask_contrast_od", None)
    if contrast is not None:
        if background_map is None:
            sigma_px = float(cfg.mask_background_sigma_um) / float(mpp)
            background_map = upsample_background(_coarse_blur_reference(h_od, sigma_px), h_od.shape, sigma_px)
        else:
            background_map = _check_image(background_map, "background_map")
        if background_map.shape != mask_map.shape:
            raise ValueError(f"background_map {background_map.shape} differs from mask_map {mask_map.shape}")
        mask &= mask_map > background_map + np.float32(contrast)
    fill_um2 = getattr(cfg, "mask_fill_holes_um2", None)
    if fill_um2 is None and contrast is None:
        return mask, mask
    max_size = None if fill_um2 is None else int(float(fill_um2) / float(mpp) ** 2)
    mask, filled = fill_holes(mask, max_size)
    return (mask, mask) if contrast is None else (mask, filled)


def fill_holes(mask: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Small holes filled, and all holes filled, from one labelling of the background.

    Parameters
    ----------
    mask : (H, W) bool ndarray
    max_size : int or None
        Holes (4-connected background components, those on the border included) of at most
        this many pixels are filled; None fills none.

    Returns
    -------
    small_filled : (H, W) bool ndarray
        ``skimage.morphology.remove_small_holes(mask, max_size=max_size)`` (``mask`` for None).
    all_filled : (H, W) bool ndarray
        ``scipy.ndimage.binary_fill_holes(small_filled)``: every background component that
        does not touch the border is filled. SciPy floods the background from the border one
        pixel per iteration, a fifth of a second on a 2048² tile.
    """
    holes, _ = ndi.label(~mask)  # 4-connected, as both library functions
    size = np.bincount(holes.ravel())
    small = np.zeros(len(size), bool)
    if max_size is not None:
        small = size <= max_size  # remove_small_holes keeps its max_size inclusive
        small[0] = False
        mask = mask | small[holes]
    else:
        mask = mask.copy()
    outside = np.zeros(len(size), bool)
    for edge in (holes[0], holes[-1], holes[:, 0], holes[:, -1]):
        outside[edge] = True
    outside[0] = False
    outside &= ~small  # a small hole on the border is already filled
    return mask, ~outside[holes]
