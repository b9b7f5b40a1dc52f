"""Optical density and colour deconvolution, in NumPy (pixels samples) and torch (batches).

Beer-Lambert: a stain of concentration ``c`` and unit OD vector ``v`` attenuates light to
``I = I0 * 10**(-c v)``; so ``OD = -log10(I / I0)`` is linear in the concentrations, and
``concentrations = OD @ pinv(stain_matrix)``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

__all__ = [
    "RUIFROK_H",
    "RUIFROK_E",
    "RUIFROK_DAB",
    "angle_deg",
    "match_stains",
    "normalize_rows",
    "stain_matrix",
    "orthogonal_stain_matrix",
    "OD_OF_UINT8",
    "od_from_rgb",
    "scale_to_reference",
    "white_point",
    "white_balance",
    "od_from_rgb_torch",
    "rgb_from_od",
    "restain",
    "rehue",
    "parse_stain_pair",
    "concentrations_torch",
    "estimate_two_stains",
]

# Ruifrok A.C., Johnston D.A. "Quantification of histochemical staining by color
# deconvolution." Anal Quant Cytol Histol 23(4):291-299, 2001 (Table 1, unit OD vectors, RGB).
RUIFROK_H = (0.650, 0.704, 0.286)
RUIFROK_E = (0.072, 0.990, 0.105)
RUIFROK_DAB = (0.268, 0.570, 0.776)

_MIN_INTENSITY = 1.0  # one grey level: keeps log finite for saturated black pixels
#: optical density of each 8-bit intensity (float32; as :func:`od_from_rgb`): a look-up table
OD_OF_UINT8 = np.maximum(-np.log10(np.maximum(np.arange(256, dtype=np.float32), _MIN_INTENSITY) / np.float32(255.0)),
                         np.float32(0.0))  # glass reads +0, not -0


def normalize_rows(m: np.ndarray) -> np.ndarray:
    """Scale each row of ``m`` to unit Euclidean length."""
    m = np.asarray(m, dtype=np.float64)
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


def stain_matrix(*vectors: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Stack stain OD vectors into a (3, 3) matrix, completing it with an orthogonal residual.

    Parameters
    ----------
    *vectors : (3,) array-like
        Two or three stain vectors in RGB optical density.

    Returns
    -------
    rgb_from_stains : (3, 3) float64 ndarray
        Unit rows; with two stains the third row is their normalised cross product,
        which collects what neither stain explains.
    """
    rows = normalize_rows(np.asarray(vectors, dtype=np.float64))
    if rows.shape == (2, 3):
        # |cross product|: a residual in the positive OD octant, as Ruifrok & Johnston's
        # third vector. Not orthogonal to both stains, but the H&E thresholds are calibrated
        # with this matrix (the signed, orthogonal residual cost 3 points of detection F1).
        third = np.abs(np.cross(rows[0], rows[1]))
        rows = np.vstack([rows, third / np.linalg.norm(third)])
    if rows.shape != (3, 3):
        raise ValueError(f"expected 2 or 3 stain vectors of length 3, got shape {rows.shape}")
    return rows


def orthogonal_stain_matrix(first: np.ndarray | tuple, second: np.ndarray | tuple) -> np.ndarray:
    """Two stain vectors completed with the normal of their plane as the residual row.

    With an orthogonal residual the two concentrations are the least-squares fit of each pixel's
    OD in the stains' plane. :func:`stain_matrix` folds its residual into the positive octant,
    which for haematoxylin and DAB leaves it 1.8 degrees from the haematoxylin and the matrix
    ill-conditioned (a DAB pixel 4 degrees off the plane read -0.4 OD of haematoxylin).

    Parameters
    ----------
    first, second : (3,) array-like
        Stain OD vectors (RGB); normalised here.

    Returns
    -------
    rgb_from_stains : (3, 3) float64 ndarray
        Rows: the two unit stain vectors and their normalised cross product.
    """
    rows = normalize_rows(np.vstack([np.asarray(first, np.float64), np.asarray(second, np.float64)]))
    normal = np.cross(rows[0], rows[1])
    return np.vstack([rows, normal / np.linalg.norm(normal)])


def od_from_rgb(rgb: np.ndarray, background: float = 255.0) -> np.ndarray:
    """Optical density of RGB pixels.

    Parameters
    ----------
    rgb : (..., 3) uint8 or float ndarray
        Transmitted intensity, 0..``background``.
    background : float
        Intensity of clear glass.

    Returns
    -------
    od : (..., 3) float32 ndarray
        ``-log10(I / I0)``, 0 on glass, about 2.4 for black.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8 and background == 255.0:
        return OD_OF_UINT8[rgb]  # the same float32 values, looked up
    # a new array: a float32 input is not clamped in place
    x = np.maximum(np.asarray(rgb, dtype=np.float32), np.float32(_MIN_INTENSITY))
    od = -np.log10(x / np.float32(background))
    np.maximum(od, 0, out=od)
    return od


def rgb_from_od(od: np.ndarray, background: float = 255.0) -> np.ndarray:
    """8-bit RGB pixels of the given optical densities (the inverse of :func:`od_from_rgb`).

    Parameters
    ----------
    od : (..., 3) float ndarray
        Optical density per channel.
    background : float
        Intensity of clear glass.

    Returns
    -------
    rgb : (..., 3) uint8 ndarray
        ``background * 10 ** -od``, rounded and clipped to 0..255.
    """
    od = np.asarray(od, dtype=np.float64)
    return np.clip(np.round(background * 10.0 ** (-od)), 0, 255).astype(np.uint8)


def scale_to_reference(reference: float, level: float, low: float, high: float) -> tuple[float, bool]:
    """Factor that brings a slide's stain ``level`` to ``reference`` (both OD), clipped to ``[low, high]``.

    Returns the factor and whether it was clipped; a level of 0 or less takes ``high``.
    """
    raw = reference / level if level > 0 else high
    scale = float(np.clip(raw, low, high))
    return scale, bool(scale != raw)


def white_point(rgb: np.ndarray, *, min_level: float = 215.0, top_frac: float = 0.01,
                min_pixels: int = 50, max_texture: float | None = 4.0,
                where: np.ndarray | None = None) -> np.ndarray | None:
    """The intensity of clear glass in an RGB image (the ``I0`` of Beer-Lambert), per channel.

    A scanner's glass is rarely 255: white calibration, lamp and a tinted mounting medium leave it
    at 230-250, often unequal between channels, and every optical density then carries an offset
    (glass at 240: 0.026 per channel, 0.08 summed), which thresholds set on a white glass read as
    stain. The clear pixels are those whose every channel reaches ``min_level`` and whose 3 x 3
    neighbourhood is flat (glass and a fat lumen are; pale tissue has texture); the white point is
    the per-channel median of the brightest ``top_frac`` of them (by summed intensity), so a few
    saturated pixels do not set it and pale tissue, below the glass, does not pull it down.

    Parameters
    ----------
    rgb : (..., 3) uint8 ndarray
        Pixels of the slide (an overview, a field).
    min_level : float
        Least intensity of every channel of a clear pixel; also the darkest white point accepted.
    top_frac : float
        Share of the clear pixels, the brightest, that the median is taken over.
    min_pixels : int
        Fewer clear pixels than this: no white point (a field of tissue only).
    max_texture : float or None
        Largest standard deviation of the mean intensity over a pixel's 3 x 3 neighbourhood, grey
        levels, of a clear pixel of a 2-D image; None: no flatness test.
    where : (H, W) bool ndarray, optional
        Only these pixels may be clear (e.g. outside the tissue mask: the glass).

    Returns
    -------
    white : (3,) float64 ndarray or None
        Intensity of glass per channel (<= 255), or None when too few pixels are clear.
    """
    rgb = np.asarray(rgb)
    px = rgb.reshape(-1, 3)
    ok = (px >= min_level).all(axis=1)
    if max_texture is not None and rgb.ndim == 3 and min(rgb.shape[:2]) >= 3:
        grey = rgb.astype(np.float32).mean(axis=2)
        mean = cv2.blur(grey, (3, 3))
        std = np.sqrt(np.maximum(cv2.blur(grey * grey, (3, 3)) - mean * mean, 0))
        ok &= (std <= np.float32(max_texture)).ravel()
    if where is not None:
        ok &= np.asarray(where, bool).ravel()
    clear = px[ok]
    if len(clear) < min_pixels:
        return None
    n = max(min_pixels, int(math.ceil(top_frac * len(clear))))
    total = clear.astype(np.int32).sum(axis=1)
    top = clear[np.argpartition(total, len(clear) - n)[len(clear) - n:]] if n < len(clear) else clear
    return np.median(top, axis=0).astype(np.float64)


def white_balance(rgb: np.ndarray, white: np.ndarray | None) -> np.ndarray:
    """``rgb`` with ``white`` brought to 255 in every channel (intensities scaled, clipped at 255).

    Dividing the intensity by the glass's is what makes optical density ``-log10(I / I0)`` relative
    to the glass; a uint8 image is mapped through one lookup table per channel.
    """
    rgb = np.asarray(rgb)
    if white is None or np.all(np.asarray(white) >= 255):
        return rgb
    gain = 255.0 / np.asarray(white, np.float64)
    lut = np.clip(np.round(np.arange(256)[:, None] * gain[None, :]), 0, 255).astype(np.uint8)
    if rgb.dtype != np.uint8:
        raise TypeError(f"white_balance needs uint8 RGB, got {rgb.dtype}")
    # OpenCV's per-channel table lookup, ~10x NumPy's fancy indexing on a tile
    return cv2.LUT(np.ascontiguousarray(rgb), lut.reshape(256, 1, 3))


def restain(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The image as it would look stained ``factor`` times as strongly.

    By Beer-Lambert every optical density scales with the amount of dye in the light path, so a
    section 30 % thicker, or a run that deposits 30 % more of every dye, is ``restain(rgb, 1.3)``.
    The evaluation scripts' ``--od-scale`` uses it to measure how the analyzers follow the stain.

    Parameters
    ----------
    rgb : (..., 3) uint8 ndarray
        Transmitted intensity, 0..255 (255 is glass).
    factor : float
        Multiplier of every optical density (> 0).

    Returns
    -------
    (..., 3) uint8 ndarray
    """
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    od = -np.log10(np.clip(np.asarray(rgb, dtype=np.float64), _MIN_INTENSITY, 255.0) / 255.0)
    return rgb_from_od(factor * od)


def parse_stain_pair(text: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Two stain OD vectors written ``A1,A2,A3:B1,B2,B3`` (the scripts' ``--hue``).

    Raises
    ------
    ValueError
        Anything but two colon-separated triples of numbers.
    """
    try:
        pair = tuple(tuple(float(v) for v in part.split(",")) for part in text.split(":"))
    except ValueError:
        pair = ()
    if len(pair) != 2 or any(len(v) != 3 for v in pair):
        raise ValueError(f"{text!r}: expected two stain vectors as A1,A2,A3:B1,B2,B3")
    return pair  # type: ignore[return-value]


def rehue(rgb: np.ndarray, source: tuple, target: tuple) -> np.ndarray:
    """The image as another lab's stains of the same amounts would show it.

    Beer-Lambert: each pixel's concentrations by the ``source`` stain matrix, its optical density
    again by the ``target`` one. The residual, the OD neither stain explains, is taken along the
    normal of each pair's plane and keeps its amount (:func:`orthogonal_stain_matrix`). The
    evaluation scripts' ``--hue`` uses it to measure how the analyzers follow the stain's hue.

    Parameters
    ----------
    rgb : (..., 3) uint8 ndarray
        Transmitted intensity, 0..255 (255 is glass).
    source, target : pair of 3-vectors
        The two stains' OD vectors (e.g. haematoxylin and eosin) the image was stained with and
        the ones to restain it with; normalised here.

    Returns
    -------
    (..., 3) uint8 ndarray
    """
    rgb = np.asarray(rgb)
    od = od_from_rgb(rgb).reshape(-1, 3).astype(np.float64)
    m = np.linalg.inv(orthogonal_stain_matrix(*source)) @ orthogonal_stain_matrix(*target)
    return rgb_from_od((od @ m).reshape(rgb.shape))


def od_from_rgb_torch(x: torch.Tensor, background: float = 255.0) -> torch.Tensor:
    """Optical density of a ``(B, 3, H, W)`` float batch of intensities 0..255."""
    # the same operations as -log10(clamp(x, 1) / I0) clamped at 0, one tile-sized buffer
    return torch.clamp(x, min=_MIN_INTENSITY).div_(background).log10_().neg_().clamp_(min=0.0)


def concentrations_torch(od: torch.Tensor, rgb_from_stains: np.ndarray) -> torch.Tensor:
    """Deconvolve a ``(B, 3, H, W)`` OD batch into ``(B, 3, H, W)`` stain concentrations.

    Parameters
    ----------
    od : (B, 3, H, W) float tensor
    rgb_from_stains : (3, 3) ndarray
        Rows are unit stain vectors (see :func:`stain_matrix`).
    """
    # A pixel's OD row vector is ``c @ rgb_from_stains``, so ``c = od @ inv(rgb_from_stains)``.
    stains_from_rgb = np.linalg.inv(np.asarray(rgb_from_stains, dtype=np.float64))
    m = torch.as_tensor(stains_from_rgb, dtype=od.dtype, device=od.device)  # (3 rgb, 3 stains)
    return torch.einsum("bchw,cs->bshw", od, m)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two OD vectors (any length), degrees."""
    a = np.asarray(a, np.float64) / np.linalg.norm(a)
    b = np.asarray(b, np.float64) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


def match_stains(vectors: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two estimated stain vectors in the order of the first two rows of ``reference``.

    The pairing with the smaller summed angle wins, so the estimator's own order (by red/blue
    ratio) never swaps, say, a purple haematoxylin and a brown DAB.

    Parameters
    ----------
    vectors : (2, 3) array-like
        Estimated stain vectors (:func:`estimate_two_stains`).
    reference : (>= 2, 3) array-like
        Reference vectors; rows 0 and 1 are the stains to match.

    Returns
    -------
    first, second : (3,) ndarray
        The vectors closest to ``reference[0]`` and ``reference[1]``.
    """
    a = [[angle_deg(v, reference[j]) for j in range(2)] for v in vectors]
    return (vectors[0], vectors[1]) if a[0][0] + a[1][1] <= a[0][1] + a[1][0] else (vectors[1], vectors[0])


def estimate_two_stains(
    od_pixels: np.ndarray,
    *,
    min_od: float = 0.15,
    percentile: float = 1.0,
    min_pixels: int = 500,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Estimate two stain vectors from OD pixels (Macenko et al., ISBI 2009).

    Pixels with summed OD below ``min_od`` are discarded; the rest are projected onto the
    plane of their two main principal directions and the extreme angles (robust
    ``percentile`` and ``100 - percentile``) give the two stain directions.

    Parameters
    ----------
    od_pixels : (N, 3) float ndarray
        Optical densities.
    min_od : float
        Minimum summed OD of a pixel used for the estimate.
    percentile : float
        Robust extreme of the angle distribution, percent.
    min_pixels : int
        Fewer usable pixels than this give ``None``.
    reference : (>= 2, 3) array-like, optional
        Reference stain vectors: the estimate is then given in the order of their first two rows
        (:func:`match_stains`), not by red/blue ratio.

    Returns
    -------
    vectors : (2, 3) float64 ndarray or None
        Unit stain vectors, ordered by decreasing red/blue OD ratio (the stain that looks
        bluest first: haematoxylin before eosin or DAB). None when the estimate is impossible.
    info : dict
        ``n_pixels`` used and the angle spread in degrees.

    References
    ----------
    Macenko M. et al. "A method for normalizing histology slides for quantitative
    analysis." IEEE ISBI 2009, 1107-1110.
    """
    od = np.asarray(od_pixels, dtype=np.float64).reshape(-1, 3)
    od = od[od.sum(axis=1) > min_od]
    info = {"n_pixels": int(len(od))}
    if len(od) < min_pixels:
        return None, info
    cov = np.cov(od, rowvar=False)
    _, evecs = np.linalg.eigh(cov)
    plane = evecs[:, [2, 1]]  # two largest
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    if plane[:, 1].sum() < 0:
        plane[:, 1] *= -1
    proj = od @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [percentile, 100 - percentile])
    info["angle_spread_deg"] = float(np.degrees(hi - lo))
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    vecs = normalize_rows(np.abs(np.vstack([v1, v2])))
    # Haematoxylin absorbs red most (it looks blue): the higher red/blue OD ratio goes first.
    order = np.argsort(-(vecs[:, 0] / np.maximum(vecs[:, 2], 1e-6)))
    vecs = vecs[order]
    if reference is not None:
        vecs = np.vstack(match_stains(vecs, np.asarray(reference, np.float64)))
    return vecs, info
