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


def _in_slabs(y: torch.Tensor, r: int, dim: int, n: int, fn) -> torch.Tensor:
    """``fn(y, n)`` for an input ``y`` padded by ``r`` on both sides of ``dim``, over row slabs.

    On the CPU the passes of a filter over a whole tile are memory-bound: run them over slabs
    of rows that fit in the cache. Every output element sees the same operations in the same
    order, so the result is bit-identical to one call over the whole tensor.
    """
    if y.device.type != "cpu" or y.dim() != 4:
        return fn(y, n)
    rows = y.shape[-2] - (2 * r if dim == -2 else 0)
    shape = list(y.shape)
    shape[dim] = n
    out = y.new_empty(shape)
    step = max(1, _SLAB_ELEMENTS // max(1, y.shape[0] * y.shape[1] * y.shape[-1]))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if dim == -2:
            out[..., r0:r1, :] = fn(y[..., r0 : r1 + 2 * r, :], r1 - r0)
        else:
            out[..., r0:r1, :] = fn(y[..., r0:r1, :], n)
    return out


def _blur_axis(x: torch.Tensor, taps: list[float], dim: int, mode: str) -> torch.Tensor:
    r = (len(taps) - 1) // 2
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    return _in_slabs(F.pad(x, pad, mode=mode), r, dim, x.shape[dim],
                     lambda y, n: _blur_slab(y, taps, dim, n))


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


def _running_max(x: torch.Tensor, r: int, dim: int, op=torch.maximum) -> torch.Tensor:
    """Maximum (or ``op``) over ``2r + 1`` samples along ``dim`` with replicated borders (van
    Herk doubling: ``ceil(log2(2r + 1)) + 1`` elementwise maxima whatever ``r``)."""
    w = 2 * r + 1
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)

    def run(y: torch.Tensor, n: int) -> torch.Tensor:
        p = 1
        while 2 * p <= w:
            m = y.shape[dim]
            y = op(y.narrow(dim, 0, m - p), y.narrow(dim, p, m - p))
            p *= 2
        return op(y.narrow(dim, 0, n), y.narrow(dim, w - p, n))

    # few passes whatever r: not worth slabbing
    return run(F.pad(x, pad, mode="replicate"), x.shape[dim])


def max_filter(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Maximum over a square of half-side ``round(radius_px)``, ``(B, C, H, W)``."""
    r = int(round(radius_px))
    if r <= 0:
        return x
    return _running_max(_running_max(x, r, -1), r, -2)


def min_filter(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Minimum over a square of half-side ``round(radius_px)``, ``(B, C, H, W)``."""
    r = int(round(radius_px))
    if r <= 0:
        return x
    return _running_max(_running_max(x, r, -1, torch.minimum), r, -2, torch.minimum)


def grey_dilation(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Grey-level dilation with a square of half-side ``round(radius_px)``."""
    return max_filter(x, radius_px)


def grey_opening(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Grey-level opening (erosion, then dilation) with a square of half-side ``round(radius_px)``:
    removes structures brighter than their surroundings and narrower than the square."""
    return max_filter(min_filter(x, radius_px), radius_px)
