"""The dense part of the fibre maths, in torch on the batch: Gaussian, a multi-scale ridge contrast, grey
opening; and the fibre mask by hysteresis.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from marrowseg.analyzers import filters

__all__ = ["gaussian_blur_torch", "ridge_contrast_torch", "fibre_mask", "grey_dilation_torch", "grey_opening_torch"]


def gaussian_blur_torch(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, 1, H, W)`` tensor with mirrored borders
    (:func:`marrowseg.analyzers.filters.gaussian_blur`)."""
    return filters.gaussian_blur(img, sigma_px)


def _shifted(img: torch.Tensor, offsets: list[tuple[torch.Tensor, float, torch.Tensor, float]]) -> list[torch.Tensor]:
    """Bilinear samples of ``img`` (B,1,H,W) at (row + sr * drow, col + sc * dcol) for K offsets.

    ``offsets`` holds ``(drow, sr, dcol, sc)`` per offset: (B, 1, H, W) tensors and signs
    (+1 or -1; a negated product rounds as the product does, so the caller multiplies once
    for an offset and its mirror). Returns K tensors (B, 1, H, W). Beyond the edge the border
    value is used.
    """
    kk = len(offsets)
    b, _, h, w = img.shape
    rows = torch.arange(h, dtype=img.dtype, device=img.device).view(1, h, 1)
    cols = torch.arange(w, dtype=img.dtype, device=img.device).view(1, 1, w)
    # grid_sample wants (x, y) in [-1, 1]; align_corners=True maps -1/1 to the edge pixel centres.
    # The K grids of an image are stacked along its rows (one (B, K*H, W, 2) grid): the image is
    # sampled once per offset without K copies of it, and each coordinate takes the float32
    # steps of ``(rows + drow) * (2 / (h - 1)) - 1``
    grid = torch.empty((b, kk, h, w, 2), dtype=img.dtype, device=img.device)
    for k, (drow, sr, dcol, sc) in enumerate(offsets):
        for j, base, d, sign in ((0, cols, dcol, sc), (1, rows, drow, sr)):
            (torch.add if sign > 0 else torch.sub)(base, d[:, 0], out=grid[:, k, :, :, j])
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=img.dtype, device=img.device)
    grid.mul_(scale).sub_(1.0)
    out = F.grid_sample(img, grid.view(b, kk * h, w, 2), mode="bilinear", padding_mode="border", align_corners=True)
    return list(out.view(b, 1, kk, h, w).unbind(2))


def ridge_contrast_torch(
    od: torch.Tensor,
    mpp: float,
    *,
    scales_um: tuple[float, ...],
    flank_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale ridge contrast of dark lines, in OD, with edge and blob suppression.

    At each scale ``s`` the OD image is smoothed by a Gaussian of ``s`` and the Hessian gives
    the local line direction (eigenvector of the most negative eigenvalue is the normal
    ``n``; ``t`` is the tangent). With ``d = flank_factor * s`` the response is::

        N = min(c - c(x + d n), c - c(x - d n))      # darker than *both* flanks
        T = min(c - c(x + d t), c - c(x - d t))      # darker than both ends: a blob, not a line
        P = max(c(x + d t), c(x - d t)) - c                 # darker along the line: beside a blob
        R = max(N - max(T, 0) - max(P - N, 0), 0)

    so a step edge (one flank darker) gives ``N <= 0``, the flat inside of a large dark
    nucleus gives ``N ~ 0``, a small round blob gives ``T ~ N``, and the halo around a blob
    (where the largest curvature is tangential) gives ``P >> N``; a line keeps its full OD
    contrast over its flanks. ``R`` is the maximum over scales.

    Parameters
    ----------
    od : (B, 1, H, W) float tensor
        Optical density of the fibre stain (achromatic darkness for silver).
    mpp : float
        Pixel size, µm per pixel.
    scales_um : tuple of float
        Gaussian scales, µm (about the fibre half-widths to detect).
    flank_factor : float
        Distance of the flank samples in units of the scale.

    Returns
    -------
    ridge_od : (B, 1, H, W) tensor
        Line contrast, OD (>= 0).
    scale_idx : (B, 1, H, W) uint8 tensor
        Index into ``scales_um`` of the winning scale.
    """
    if od.dim() != 4 or od.shape[1] != 1:
        raise ValueError(f"expected od of shape (B, 1, H, W), got {tuple(od.shape)}")
    best = torch.zeros_like(od)
    best_idx = torch.zeros(od.shape, dtype=torch.uint8, device=od.device)
    for i, s_um in enumerate(scales_um):
        s = float(s_um) / float(mpp)
        g = gaussian_blur_torch(od, s)
        # central differences of the smoothed image give the Hessian at scale s
        gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
        c = gp[..., 1:-1, 1:-1]
        hrr = gp[..., 2:, 1:-1] - 2 * c + gp[..., :-2, 1:-1]
        hcc = gp[..., 1:-1, 2:] - 2 * c + gp[..., 1:-1, :-2]
        hrc = 0.25 * (gp[..., 2:, 2:] - gp[..., 2:, :-2] - gp[..., :-2, 2:] + gp[..., :-2, :-2])
        # orientation of the principal axes; the normal is the direction of strongest
        # (most negative) curvature for a bright-in-OD ridge
        theta = 0.5 * torch.atan2(2 * hrc, hrr - hcc)
        cr, cc = torch.cos(theta), torch.sin(theta)
        k1 = hrr * cr * cr + 2 * hrc * cr * cc + hcc * cc * cc  # curvature along (cr, cc)
        k2 = hrr * cc * cc - 2 * hrc * cr * cc + hcc * cr * cr  # along the perpendicular
        swap = k2 < k1
        nr = torch.where(swap, -cc, cr)
        nc = torch.where(swap, cr, cc)
        d = float(flank_factor) * s
        ar, ac = nr * d, nc * d
        n_plus, n_minus, t_plus, t_minus = _shifted(g, [(ar, 1, ac, 1), (ar, -1, ac, -1), (ac, -1, ar, 1),
                                                        (ac, 1, ar, -1)])
        n_con = torch.minimum(g - n_plus, g - n_minus)
        t_con = torch.minimum(g - t_plus, g - t_minus).clamp(min=0)
        # along a fibre the OD stays level; a darker point there means we stand beside a
        # larger dark object (the halo of a nucleus), where the Hessian turns tangential
        t_dark = torch.maximum(t_plus, t_minus) - g
        r = (n_con - t_con - (t_dark - n_con).clamp(min=0)).clamp(min=0)
        better = r > best
        best = torch.where(better, r, best)
        best_idx = torch.where(better, torch.full_like(best_idx, i), best_idx)
    return best, best_idx


def fibre_mask(
    ridge_od: np.ndarray,
    *,
    low_od: float,
    high_od: float,
    fill: np.ndarray | None = None,
) -> np.ndarray:
    """Hysteresis threshold of the ridge contrast.

    Parameters
    ----------
    ridge_od : (H, W) float ndarray
        Line contrast, OD (see :func:`ridge_contrast_torch`).
    low_od, high_od : float
        Pixels above ``low_od`` that connect (8-connectivity) to a pixel above ``high_od``.
    fill : (H, W) bool ndarray, optional
        Extra pixels that may extend a fibre like those above ``low_od`` (the centre of a
        crossing, where the flanks of one fibre fall on the other and the ridge contrast
        vanishes).

    Returns
    -------
    (H, W) bool ndarray
    """
    ridge_od = np.asarray(ridge_od)
    if ridge_od.ndim != 2:
        raise ValueError(f"expected a 2-D ridge map, got shape {ridge_od.shape}")
    low = ridge_od >= float(low_od)
    if fill is not None:
        low |= np.asarray(fill, bool)
    high = ridge_od >= float(high_od)
    lab, n = ndi.label(low, structure=np.ones((3, 3), bool))
    keep = np.zeros(n + 1, bool)
    keep[np.unique(lab[high & low])] = True
    keep[0] = False
    return keep[lab]


def grey_dilation_torch(img: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Grey-level dilation (local maximum) over a square of half-side ``radius_px``, (B,1,H,W)."""
    return filters.grey_dilation(img, radius_px)


def grey_opening_torch(img: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Grey-level opening (erosion then dilation) with a square of half-side ``radius_px``.

    Removes bright-in-OD structures narrower than ``2 * radius_px + 1`` pixels; what
    remains is the local background under thin fibres. ``(B, 1, H, W)`` in and out.
    """
    return filters.grey_opening(img, radius_px)
