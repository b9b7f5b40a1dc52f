"""The slide's E-cadherin membrane density, and the DAB scale that brings it to a reference.

A DAB run varies between labs and days (antibody lot, retrieval, incubation): the same
membrane reads 0.5-1.5x the density. The positivity threshold is an absolute density, so a
pale run loses its positive cells (phantoms at 0.5x: E-cad+ count -34 to -100 %). The
slide's own membranes are the reference: a closed DAB ring round a nucleus is an E-cad+
cell's membrane, whatever the run's strength, so the median density of the rings in the
sample patches is the slide's membrane level, and DAB is scaled by ``reference / level``
before any threshold applies (as the counterstain is, :func:`haematoxylin_scale`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from marrowseg import stains
from marrowseg.analyzers import tissue as tis
from marrowseg.analyzers.ecad.membrane import membrane_enclosures

__all__ = ["membrane_level", "dab_scale"]

# step down of the ring cut when too few rings close at it
_LOWER = 0.75


def _ring_values(dab: np.ndarray, h: np.ndarray, mpp: float, dab_min_od: float, haze: float, cfg: Any) -> np.ndarray:
    """Mean DAB of the band just outside each closed, nucleated, cell-sized enclosure that stands
    ``dab_level_ring_contrast`` times above the enclosure's own mean DAB and above ``haze``, OD."""
    rh = cfg.ring_holes
    lab, area = membrane_enclosures(dab, mpp, dab_min_od=dab_min_od, sigma_um=rh.sigma_um)
    n = len(area)
    flat = lab.ravel()
    size = np.maximum(np.bincount(flat, minlength=n), 1)
    h_mean = np.bincount(flat, h.ravel(), n) / size
    inner = np.bincount(flat, dab.ravel(), n) / size
    # index 0 (the membrane) and open components have an infinite area: never a cell
    cell = (area >= rh.min_area_um2) & (area <= rh.max_area_um2) & (h_mean >= rh.min_h_od)
    if not cell.any():
        return np.zeros(0)
    own = np.where(cell[lab], lab, 0).astype(np.float32)
    r = max(1, int(round(cfg.stain.dab_level_band_um / mpp)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    # the membrane pixels each enclosure touches (where two share one, the higher label takes it)
    grown = cv2.dilate(own, kernel).astype(np.int64)
    band = (grown > 0) & (own == 0)
    idx = grown[band]
    sums = np.bincount(idx, dab[band], n)
    counts = np.bincount(idx, minlength=n)
    ring = sums / np.maximum(counts, 1)
    # a membrane stands out from what it encloses and from the tissue's DAB haze (unspecific
    # background), which also breaks into closed "rings" at a low cut, as dense inside as out
    ok = cell & (counts > 0) & (ring >= cfg.stain.dab_level_ring_contrast * np.maximum(inner, haze))
    return ring[ok]


def membrane_level(patches: Sequence[np.ndarray], stains_from_rgb: np.ndarray, mpp: float, cfg: Any,
                   opaque_cfg: Any = None) -> tuple[float | None, int]:
    """The slide's membrane DAB density: median over closed rings round nuclei of their mean DAB.

    Parameters
    ----------
    patches : sequence of (H, W, 3) uint8 ndarray
        Sample patches of the slide at the analysis resolution.
    stains_from_rgb : (3, 3) ndarray
        Turns RGB optical density into (haematoxylin, DAB, residual) densities; the
        haematoxylin column already carries the counterstain scale, DAB is unscaled.
    mpp : float
        Pixel size of the patches, µm per pixel.
    cfg : ECadConfig
        ``ring_holes`` (what a closed ring round a nucleus is: its DAB level after smoothing,
        the enclosed area and counterstain) and ``stain.dab_*`` (reference, steps, band).
    opaque_cfg : TissueClassesConfig, optional
        Black fill and ink are set to no stain first.

    Returns
    -------
    level : float or None
        Median ring density, OD; None when fewer than ``stain.dab_level_min_rings`` rings
        were found.
    n_rings : int

    Notes
    -----
    A ring closes where the smoothed DAB stays above ``dab_level_cut_fraction`` of the level
    (a fixed point from ``dab_reference_od``, at most ``level_max_steps`` steps), so a pale
    run's rings close as a normal run's do: with an absolute cut, only the strongest rings of
    a pale run would close and the level would read high. Where too few rings close, the cut is lowered
    by steps of 0.75 down to the one of the largest scale (``dab_scale_max``) first.
    """
    m = np.asarray(stains_from_rgb, np.float32)
    planes, stained = [], []
    for rgb in patches:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or min(rgb.shape[:2]) < 8:
            continue
        od = stains.od_from_rgb(rgb)
        conc = od @ m
        h, dab = np.maximum(conc[..., 0], 0.0), np.maximum(conc[..., 1], 0.0)
        opaque = tis.opaque_colour(rgb, opaque_cfg) if opaque_cfg is not None else None
        if opaque is not None:
            h[opaque] = 0.0
            dab[opaque] = 0.0
        planes.append((np.ascontiguousarray(dab, np.float32), np.ascontiguousarray(h, np.float32)))
        stained.append(dab[od.sum(axis=-1) > cfg.stain.min_od])
    sc = cfg.stain
    # most marrow cells are E-cad-: the median DAB of the stained tissue is its haze
    haze = float(np.median(np.concatenate(stained))) if sum(map(len, stained)) else 0.0
    level, n, steps = float(sc.dab_reference_od), 0, 0
    floor = sc.dab_reference_od / sc.dab_scale_max
    while steps < sc.level_max_steps:
        cut = sc.dab_level_cut_fraction * level
        v = np.concatenate([_ring_values(dab, h, float(mpp), cut, haze, cfg) for dab, h in planes] or [np.zeros(0)])
        n = int(len(v))
        if n < sc.dab_level_min_rings:
            # a pale run's rings do not close at the reference cut: look lower before giving up
            if level * _LOWER < floor:
                return None, n
            level *= _LOWER
            continue
        steps += 1
        new = float(np.median(v))
        done = abs(new - level) <= 0.01 * new
        level = new
        if done:
            break
    return level, n


def dab_scale(patches: Sequence[np.ndarray], stains_from_rgb: np.ndarray, mpp: float, cfg: Any,
              opaque_cfg: Any = None) -> tuple[float, dict[str, Any]]:
    """Factor that brings the slide's membrane DAB to ``stain.dab_reference_od``.

    Parameters
    ----------
    patches, stains_from_rgb, mpp, cfg, opaque_cfg
        As :func:`membrane_level`.

    Returns
    -------
    scale : float
        ``dab_reference_od / level`` clipped to ``[dab_scale_min, dab_scale_max]``; 1.0 when
        scaling is off, the positivity is read in the nucleus, or too few rings were found.
    info : dict
        ``dab_level_od``, ``dab_level_rings``, ``dab_scale``, ``dab_scale_clipped``; or
        ``dab_scale_reason`` (off by choice) / ``dab_scale_note`` (too few rings).
    """
    sc = cfg.stain
    if sc.dab_reference_od is None:
        return 1.0, {"dab_scale": 1.0, "dab_scale_reason": "off (ecad.stain.dab_reference_od: null)"}
    if cfg.positivity_compartment != "membrane" or cfg.ring_holes is None:
        return 1.0, {"dab_scale": 1.0, "dab_scale_reason": "off: the level is read from membranes "
                                                           "(ecad.positivity_compartment: membrane, ring_holes set)"}
    level, n = membrane_level(patches, stains_from_rgb, mpp, cfg, opaque_cfg)
    if level is None:
        # a normal marrow may hold few E-cad+ cells: a note, not a fallback the QA page flags
        return 1.0, {"dab_scale": 1.0, "dab_level_rings": n,
                     "dab_scale_note": f"DAB not scaled: too few closed membrane rings in the sample "
                                       f"({n} < {sc.dab_level_min_rings}); the positivity threshold is absolute"}
    scale, clipped = stains.scale_to_reference(sc.dab_reference_od, level, sc.dab_scale_min, sc.dab_scale_max)
    return scale, {"dab_level_od": level, "dab_level_rings": n, "dab_scale": scale, "dab_scale_clipped": clipped}
