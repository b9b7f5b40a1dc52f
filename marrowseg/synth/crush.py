"""Crush artefact drawn onto any brightfield image: tissue squeezed before fixation.

A trephine core gripped by forceps, or twisted in the needle, is squeezed across one direction
and extruded along the other before it is fixed; fragile nuclei rupture and their chromatin is
dragged into strands, so a crushed field shows dark, parallel streaks in which single cells can
no longer be told apart (Bain, Clark & Wilkins, *Bone Marrow Pathology*, artefacts of the
trephine biopsy). Drawn here by Beer-Lambert absorbance: the field is resampled squeezed by
``squeeze`` and stretched by ``stretch``; the stain per unit area rises by 1 / (stretch x
squeeze), since the same material covers less of the section; and every absorbance is smeared
along the stretch over ``smear_um``. Nothing here knows how crush is detected.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["crush_field"]


def crush_field(rgb: np.ndarray, mpp: float, *, stretch: float = 1.6, squeeze: float = 0.45,
                smear_um: float = 8.0, wave_um: float = 0.0, seed: int = 0) -> np.ndarray:
    """A crushed copy of a field, squeezed along its rows and stretched along its columns.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        A brightfield field (glass near 255).
    mpp : float
        Its pixel size, µm/px.
    stretch : float
        Factor along x (>= 1: extruded).
    squeeze : float
        Factor along y (<= 1: squeezed).
    smear_um : float
        Length over which absorbance is dragged along x, µm (0: none).
    wave_um : float
        Amplitude of a slow sideways wave of the strands, µm (0: straight).
    seed : int
        Phase and period of the wave.

    Returns
    -------
    (round(H * squeeze), W, 3) uint8 ndarray
        The crushed field: the middle ``W`` columns of the stretched one (a stretch takes
        ``W / stretch`` columns of the input), at the same pixel size.
    """
    if not (stretch >= 1.0 and 0.0 < squeeze <= 1.0):
        raise ValueError(f"stretch must be >= 1 and squeeze in (0, 1], got {stretch}, {squeeze}")
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / np.float32(255.0))
    h2, w2 = max(8, int(round(h * squeeze))), max(w, int(round(w * stretch)))
    od = cv2.resize(od, (w2, h2), interpolation=cv2.INTER_AREA) / np.float32(stretch * squeeze)
    if wave_um > 0:
        rng = np.random.default_rng(seed)
        period_px = rng.uniform(40.0, 80.0) / mpp
        yy, xx = np.mgrid[0:h2, 0:w2].astype(np.float32)
        shift = (wave_um / mpp) * np.sin(2 * np.pi * xx / period_px + rng.uniform(0, 2 * np.pi))
        od = cv2.remap(od, xx, (yy + shift).astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    n = int(round(smear_um / mpp))
    if n > 1:
        od = cv2.blur(od, (n, 1), borderType=cv2.BORDER_REFLECT)
    x0 = (w2 - w) // 2
    od = od[:, x0 : x0 + w]
    return np.clip(np.float32(255.0) * np.power(np.float32(10.0), -od), 0, 255).round().astype(np.uint8)
