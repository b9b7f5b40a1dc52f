"""How much of a crossing is two fibres overlapping rather than a junction: local fibre cover around
a crossing, with and without the crossing itself.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["gaussian_zero_border", "overlap_factor", "overlap_fraction", "boolean_factor", "crossing_overlap_factor", "own_cover", "cover_without_own"]


def gaussian_zero_border(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with zeros beyond the edge, as ``ndi.gaussian_filter(img, sigma_px, mode="constant", truncate=3.0)``.

    Parameters
    ----------
    img : (H, W) float32 or float64 ndarray
    sigma_px : float
        Standard deviation, pixels.

    Returns
    -------
    (H, W) ndarray of ``img``'s dtype
        SciPy's kernel (radius ``int(3 sigma + 0.5)``), through OpenCV's separable filter:
        2.4x faster in float32 on a 1,100² tile at sigma 20 px (28 against 67 ms), equal to
        SciPy within float rounding (3e-7 of the maximum in float32, 1e-15 in float64).
    """
    img = np.asarray(img)
    radius = int(3.0 * float(sigma_px) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / float(sigma_px)) ** 2)
    k = (k / k.sum()).astype(img.dtype)
    return cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_CONSTANT)


def overlap_factor(
    fibre: np.ndarray,
    region: np.ndarray,
    sigma_px: float,
    *,
    max_frac: float,
) -> np.ndarray:
    """Boolean-model factor by which a skeleton under-measures overlapping fibres, per pixel.

    Fibres of width ``w`` and length density ``L`` laid down at random cover the area fraction
    ``p = 1 - exp(-L w)`` (Boolean model); a skeleton traces only the visible union, about
    ``p / w`` per unit area, so the true length is the skeleton length times
    ``-ln(1 - p) / p``. ``p`` is the local fibre fraction of ``region`` (Gaussian-weighted,
    ``sigma_px``, truncated at ``3 sigma``). The factor is 1 where fibres are sparse
    (``p -> 0``) and grows where they merge (1.19 at ``p = 0.3``).

    Parameters
    ----------
    fibre : (H, W) bool ndarray
        Fibre mask (within ``region``).
    region : (H, W) bool ndarray
        Where fibres are measured (haematopoietic tissue).
    sigma_px : float
        Scale of the local fraction, pixels (> 0).
    max_frac : float
        ``p`` is capped here (< 1), bounding the factor.

    Returns
    -------
    (H, W) float64 ndarray
        Factor >= 1; 1 where ``region`` is (locally) absent.

    References
    ----------
    Serra J. Image Analysis and Mathematical Morphology. Academic Press, 1982, ch. XIII
    (Boolean model: covered fraction ``1 - exp(-theta E[area])``).
    """
    fibre = np.asarray(fibre, bool)
    region = np.asarray(region, bool)
    if fibre.shape != region.shape or fibre.ndim != 2:
        raise ValueError(f"fibre and region: expected two equal (H, W) masks, got {fibre.shape}, {region.shape}")
    if not 0 < max_frac < 1:
        raise ValueError(f"max_frac must be in (0, 1), got {max_frac}")
    if not fibre.any():
        return np.ones(fibre.shape, np.float64)
    return boolean_factor(np.minimum(overlap_fraction(fibre, region, sigma_px), max_frac))


def overlap_fraction(fibre: np.ndarray, region: np.ndarray, sigma_px: float) -> np.ndarray:
    """Local fibre fraction ``p`` of ``region`` behind :func:`overlap_factor` (uncapped), (H, W) float64."""
    fibre = np.asarray(fibre, bool)
    region = np.asarray(region, bool)
    s = float(sigma_px)
    mf = gaussian_zero_border((fibre & region).astype(np.float32), s)
    mr = gaussian_zero_border(region.astype(np.float32), s)
    ok = mr > 1e-3
    return np.clip(np.where(ok, mf / np.where(ok, mr, 1.0), 0.0), 0.0, 1.0).astype(np.float64)


def boolean_factor(p: np.ndarray) -> np.ndarray:
    """Boolean-model length factor ``-ln(1 - p) / p`` of a covered fraction ``p`` (1 at ``p = 0``)."""
    p = np.asarray(p, np.float64)
    out = np.ones(p.shape, np.float64)
    pos = p > 1e-6
    out[pos] = -np.log1p(-p[pos]) / p[pos]
    return out


def crossing_overlap_factor(
    cover: np.ndarray,
    own_cover: np.ndarray,
    exponent: float,
    *,
    max_frac: float,
) -> np.ndarray:
    """Factor by which a skeleton under-counts the crossings of overlapping fibres, per pixel.

    A model, not a measurement. The count of :func:`crossings` (sum of ``(deg - 2) / 2`` over
    branch points, i.e. edges minus nodes of the skeleton graph) is, by Euler's formula, the
    number of holes the fibre network encloses (plus end effects). For random straight
    fibres of width ``w`` (Poisson lines of length density ``L_A``) each crossing is the
    corner of one cell of the line tessellation; a cell stays open in the fibre mask when it
    holds a disk of radius ``w / 2``, and the inradius of the typical cell is exponential
    with mean ``1 / (2 L_A)`` (Miles 1964), so a fraction ``exp(-L_A w) = 1 - p`` of them
    stays open, ``p`` the area fraction the fibres cover (Boolean model, as in
    :func:`overlap_factor`). The count is therefore divided by ``(1 - p) ** exponent``
    (1 for this model, 0 for none). ``1 / (1 - p)`` is within 2 % of the square of the
    length factor ``-ln(1 - p) / p`` for ``p <= 0.4``, as it must: for random lines the
    crossing density is ``L_A^2 / pi``, so if the visible network is ``1 / f`` as long it
    shows ``1 / f^2`` of the crossings.

    ``p`` is the cover of the plane. The local cover ``cover`` measured at a crossing also
    holds the two fibres through it; the other fibres are unaffected by conditioning on the
    point (Slivnyak's theorem), so those two fibres' share ``s = own_cover`` is removed:
    ``p = (cover - s) / (1 - s)``. Without this, crossings gained +21..+27 % in MF-2
    phantoms (tuning seeds 2 and 6, the square of the length factor at the branch point).

    Parameters
    ----------
    cover : (H, W) float ndarray
        Local fibre fraction of the marrow (:func:`overlap_fraction`).
    own_cover : (H, W) float ndarray
        Share of the local window covered by the fibres crossing at the pixel (two straight
        fibres of width ``w`` and a Gaussian window of ``sigma``: ``2 w / (sqrt(2 pi) sigma)``).
    exponent : float
        Power of ``1 / (1 - p)`` (>= 0).
    max_frac : float
        Cap on ``p`` (as in :func:`overlap_factor`).

    Returns
    -------
    (H, W) float64 ndarray
        Factor >= 1.

    References
    ----------
    Miles R.E. "Random polygons determined by random lines in a plane." PNAS 52:901-907, 1964.
    Stoyan D., Kendall W.S., Mecke J. Stochastic Geometry and its Applications, 2nd ed.
    Wiley, 1995 (Slivnyak's theorem; Boolean model).
    """
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    p = cover_without_own(cover, own_cover, max_frac=max_frac)
    return np.power(1.0 - p, -float(exponent))


def own_cover(width_um: np.ndarray, n_fibres: int, sigma_um: float) -> np.ndarray:
    """Share of a Gaussian window covered by ``n_fibres`` straight fibres through its centre.

    A straight strip of width ``w`` through the centre of a 2-D Gaussian window of scale
    ``sigma`` (``w << sigma``) holds ``w / (sqrt(2 pi) sigma)`` of the window's weight (the
    1-D Gaussian density at 0 times the width).

    Parameters
    ----------
    width_um : ndarray
        Fibre width, µm.
    n_fibres : int
        Fibres through the point (1 on a fibre, 2 at a crossing).
    sigma_um : float
        Window scale, µm (> 0).

    Returns
    -------
    ndarray
        Covered share (dimensionless), same shape as ``width_um``.
    """
    return n_fibres * np.asarray(width_um, np.float64) / (math.sqrt(2 * math.pi) * float(sigma_um))


def cover_without_own(cover: np.ndarray, own: np.ndarray, *, max_frac: float) -> np.ndarray:
    """Cover of the plane from the cover measured at a fibre point (Palm / Slivnyak).

    The local cover measured at a point on a fibre holds that fibre's own share ``s``; the
    other fibres of a Boolean model are distributed as anywhere else (Slivnyak's theorem), so
    they cover ``p`` of the rest: ``cover = s + (1 - s) p``, hence ``p = (cover - s) / (1 - s)``.

    Parameters
    ----------
    cover : ndarray
        Local fibre fraction measured at the point (:func:`overlap_fraction`).
    own : ndarray
        Share of the window covered by the point's own fibre(s) (:func:`own_cover`); clipped
        to [0, 0.9].
    max_frac : float
        ``p`` is capped here (< 1).

    Returns
    -------
    float64 ndarray
        ``p`` in [0, max_frac].
    """
    cover = np.asarray(cover, np.float64)
    s = np.clip(np.asarray(own, np.float64), 0.0, 0.9)
    return np.clip((cover - s) / (1.0 - s), 0.0, max_frac)
