"""Counter-based noise: every value is a pure function of (key, world position).

Nothing here keeps state, so a pixel's noise does not depend on which tile it was
rendered in; that is what makes tiles stream independently.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xD6E8FEB86659FD93)
_S33 = np.uint64(33)
_S11 = np.uint64(11)
_OFF = 1 << 31  # keeps lattice indices non-negative before the uint64 view


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 finaliser on uint64 arrays (wrapping arithmetic)."""
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    return h ^ (h >> _S33)


def hash2(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """uint64 hash of integer lattice coordinates (broadcasting) under ``key``."""
    ux = (np.asarray(ix, np.int64) + _OFF).astype(np.uint64)
    uy = (np.asarray(iy, np.int64) + _OFF).astype(np.uint64)
    return fmix64(ux * _P1 ^ fmix64(uy * _P2 ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)))


def unit(h: np.ndarray) -> np.ndarray:
    """Map uint64 hashes to float64 uniforms in [0, 1)."""
    return (h >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)


def _fmix_int(h: int) -> int:
    mask = 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & mask
    return h ^ (h >> 33)


def key_of(*parts: int) -> int:
    """Fold integers into one 64-bit key."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = _fmix_int(h ^ (int(p) & 0xFFFFFFFFFFFFFFFF))
    return h


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def value_noise_grid(xs_um: np.ndarray, ys_um: np.ndarray, scale_um: float, key: int) -> np.ndarray:
    """Smooth lattice noise in [-1, 1] on the grid ``ys_um x xs_um``.

    Parameters
    ----------
    xs_um, ys_um : (W,), (H,) float64 ndarray
        Pixel-centre coordinates, µm.
    scale_um : float
        Lattice spacing, µm (the feature size).
    key : int
        Noise stream.

    Returns
    -------
    (H, W) float32 ndarray
    """
    gx = xs_um / scale_um
    gy = ys_um / scale_um
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    tx = _smooth(gx - ix).astype(np.float32)
    ty = _smooth(gy - iy).astype(np.float32)
    x0, y0 = int(ix.min()), int(iy.min())
    lx = np.arange(x0, int(ix.max()) + 2)
    ly = np.arange(y0, int(iy.max()) + 2)
    lat = (unit(hash2(lx[None, :], ly[:, None], key)) * 2.0 - 1.0).astype(np.float32)
    jx, jy = ix - x0, iy - y0
    rows = lat[jy] * (1 - ty)[:, None] + lat[jy + 1] * ty[:, None]
    return rows[:, jx] * (1 - tx)[None, :] + rows[:, jx + 1] * tx[None, :]


def value_noise_pts(x_um: np.ndarray, y_um: np.ndarray, scale_um: float, key: int) -> np.ndarray:
    """Same field as :func:`value_noise_grid`, at scattered points (float64)."""
    gx = np.asarray(x_um, np.float64) / scale_um
    gy = np.asarray(y_um, np.float64) / scale_um
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    tx = _smooth(gx - ix)
    ty = _smooth(gy - iy)

    def v(a, b):
        return unit(hash2(a, b, key)) * 2.0 - 1.0

    top = v(ix, iy) * (1 - tx) + v(ix + 1, iy) * tx
    bot = v(ix, iy + 1) * (1 - tx) + v(ix + 1, iy + 1) * tx
    return top * (1 - ty) + bot * ty


def pixel_normal(ix0: int, iy0: int, w: int, h: int, key: int) -> np.ndarray:
    """Per-pixel approximately N(0, 1) values (sum of two uniforms), keyed by global pixel index."""
    hx = np.arange(ix0, ix0 + w, dtype=np.int64)
    hy = np.arange(iy0, iy0 + h, dtype=np.int64)
    hh = hash2(hx[None, :], hy[:, None], key)
    lo = (hh & np.uint64(0xFFFFFFFF)).astype(np.float32) * np.float32(2.0**-32)
    hi = (hh >> np.uint64(32)).astype(np.float32) * np.float32(2.0**-32)
    return (lo + hi - np.float32(1.0)) * np.float32(2.449)
