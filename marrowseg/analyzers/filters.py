"""Dense filters in torch shared by the analyzers: Gaussian blur and grey-level morphology.

Written as sums and maxima of shifted slices: on the CPU these beat ``conv2d`` with 1-D
kernels and ``max_pool2d`` several times over (no im2col, and a running maximum whose cost
does not grow with the window), and they run unchanged on CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_taps", "gaussian_blur", "max_filter", "min_filter", "grey_opening", "grey_dilation"]


def gaussian_taps(sigma_px: float) -> list[float]:
    """Normalised Gaussian taps of standard deviation ``sigma_px``, truncated at ``ceil(3 sigma)``."""
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    w = [math.exp(-0.5 * (i / sigma_px) ** 2) for i in range(-radius, radius + 1)]
    total = math.fsum(w)
    return [v / total for v in w]


#: elements per slab of the CPU blur: the slab and its shifted views stay in the L2 cache
_SLAB_ELEMENTS = 1 << 17


def _blur_axis(x: torch.Tensor, taps: list[float], dim: int, mode: str) -> torch.Tensor:
    r = (len(taps) - 1) // 2
    n = x.shape[dim]
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    y = F.pad(x, pad, mode=mode)
    if x.device.type != "cpu" or x.dim() != 4:
        return _blur_slab(y, taps, dim, n)
    # On the CPU the 2r + 1 passes over a whole tile are memory-bound: run them over slabs of
    # rows that fit in the cache. Every output element sees the same operations in the same
    # order, so the result is bit-identical to the unslabbed blur.
    out = torch.empty_like(x)
    rows = x.shape[-2]
    step = max(1, _SLAB_ELEMENTS // max(1, x.shape[0] * x.shape[1] * x.shape[-1]))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if dim == -2:
            out[..., r0:r1, :] = _blur_slab(y[..., r0 : r1 + 2 * r, :], taps, dim, r1 - r0)
        else:
            out[..., r0:r1, :] = _blur_slab(y[..., r0:r1, :], taps, dim, n)
    return out


def _blur_slab(y: torch.Tensor, taps: list[float], dim: int, n: int) -> torch.Tensor:
    r = (len(taps) - 1) // 2
    out = y.narrow(dim, r, n) * taps[r]
    for i in range(1, r + 1):  # symmetric kernel: one multiply per pair of taps
        out.add_(y.narrow(dim, r - i, n) + y.narrow(dim, r + i, n), alpha=taps[r + i])
    return out


def gaussian_blur(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, C, H, W)`` tensor, mirrored at the borders.

    Parameters
    ----------
    x : (B, C, H, W) float tensor
    sigma_px : float
        Standard deviation, pixels; 0 returns ``x``.

    Returns
    -------
    (B, C, H, W) tensor, same dtype.
    """
    if sigma_px <= 0:
        return x
    taps = gaussian_taps(float(sigma_px))
    r = (len(taps) - 1) // 2
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    return _blur_axis(_blur_axis(x, taps, -1, mode), taps, -2, mode)


def _running_max(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Maximum over ``2r + 1`` samples along ``dim`` with replicated borders (van Herk doubling:
    ``ceil(log2(2r + 1)) + 1`` elementwise maxima whatever ``r``)."""
    n = x.shape[dim]
    w = 2 * r + 1
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    y = F.pad(x, pad, mode="replicate")
    p = 1
    while 2 * p <= w:
        m = y.shape[dim]
        y = torch.maximum(y.narrow(dim, 0, m - p), y.narrow(dim, p, m - p))
        p *= 2
    return torch.maximum(y.narrow(dim, 0, n), y.narrow(dim, w - p, n))


def max_filter(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Maximum over a square of half-side ``round(radius_px)``, ``(B, C, H, W)``."""
    r = int(round(radius_px))
    if r <= 0:
        return x
    return _running_max(_running_max(x, r, -1), r, -2)


def min_filter(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Minimum over a square of half-side ``round(radius_px)``, ``(B, C, H, W)``."""
    return -max_filter(-x, radius_px)


def grey_dilation(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Grey-level dilation with a square of half-side ``round(radius_px)``."""
    return max_filter(x, radius_px)


def grey_opening(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Grey-level opening (erosion, then dilation) with a square of half-side ``round(radius_px)``:
    removes structures brighter than their surroundings and narrower than the square."""
    return max_filter(min_filter(x, radius_px), radius_px)
