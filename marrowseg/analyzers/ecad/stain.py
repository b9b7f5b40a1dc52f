"""Haematoxylin-DAB separation: stain vectors estimated from the slide, the counterstain scale, and the
dense torch step of the E-cadherin analyzer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from marrowseg import stains
from marrowseg.analyzers import filters
from marrowseg.analyzers import nuclei as nuc
from marrowseg.analyzers import tissue as tis
from marrowseg.analyzers.counterstain import nuclear_level
from marrowseg.config.ecad import ECadConfig

__all__ = ["hdab_matrix", "estimate_hdab_vectors", "haematoxylin_scale", "stains_from_rgb", "ECadModule"]


def hdab_matrix(h: np.ndarray | tuple, dab: np.ndarray | tuple) -> np.ndarray:
    """Haematoxylin/DAB stain matrix with an orthogonal residual row
    (:func:`marrowseg.stains.orthogonal_stain_matrix`: rows H, DAB and their normalised cross
    product; the positive residual of :func:`marrowseg.stains.stain_matrix` is ill-conditioned for
    H and DAB)."""
    return stains.orthogonal_stain_matrix(h, dab)


def estimate_hdab_vectors(sample_rgb: np.ndarray, cfg: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Stain matrix of one slide from a sample of its pixels, or the standard one.

    Parameters
    ----------
    sample_rgb : (N, 3) uint8 ndarray
        Pixels of the slide.
    cfg : ECadStainConfig
        Estimation settings and the checks that trigger the fallback.

    Returns
    -------
    rgb_from_stains : (3, 3) float64 ndarray
        See :func:`hdab_matrix`.
    info : dict
        ``stain_vectors_source`` (``estimated`` or ``standard``), ``fallback_reason``
        (None when estimated), the pixel counts, angles and the vectors used.

    Notes
    -----
    Macenko's estimate (:func:`marrowseg.stains.estimate_two_stains`) is kept only if the
    sample has enough stained pixels and enough DAB pixels (by the standard vectors), the
    two estimated directions are a plausible angle apart, and each lies within
    ``max_angle_deg`` of its standard hue (Ruifrok & Johnston 2001). Otherwise the standard
    Ruifrok H-DAB vectors are used and the reason is returned.
    """
    standard = hdab_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)
    od = stains.od_from_rgb(np.asarray(sample_rgb).reshape(-1, 3))
    conc = od @ np.linalg.inv(standard).astype(np.float32)
    info: dict[str, Any] = {
        "method": "macenko" if cfg.vectors == "estimate" else "standard",
        "n_sample_pixels": int(len(od)),
        "n_stained_pixels": int((od.sum(axis=1) > cfg.min_od).sum()),
        "n_dab_pixels": int((conc[:, 1] >= cfg.dab_pixel_od).sum()),
    }

    def fallback(reason: str) -> tuple[np.ndarray, dict[str, Any]]:
        info.update(stain_vectors_source="standard", fallback_reason=reason,
                    h=[float(x) for x in standard[0]], dab=[float(x) for x in standard[1]])
        return standard, info

    if cfg.vectors == "standard":
        return fallback("configured (ecad.stain.vectors: standard)")
    if info["n_stained_pixels"] < cfg.min_pixels:
        return fallback(f"too few stained pixels ({info['n_stained_pixels']} < {cfg.min_pixels})")
    if info["n_dab_pixels"] < cfg.min_dab_pixels:
        return fallback(f"too few DAB pixels ({info['n_dab_pixels']} < {cfg.min_dab_pixels} at DAB OD >= {cfg.dab_pixel_od})")
    vecs, est = stains.estimate_two_stains(od, min_od=cfg.min_od, percentile=cfg.percentile, min_pixels=cfg.min_pixels,
                                           reference=standard)
    info["angle_spread_deg"] = est.get("angle_spread_deg")
    if vecs is None:
        return fallback("estimate impossible")
    h, dab = vecs
    spread = stains.angle_deg(h, dab)
    dh, dd = stains.angle_deg(h, standard[0]), stains.angle_deg(dab, standard[1])
    info.update(spread_deg=spread, h_angle_deg=dh, dab_angle_deg=dd,
                h_estimate=[float(x) for x in h], dab_estimate=[float(x) for x in dab])
    if not (cfg.min_spread_deg <= spread <= cfg.max_spread_deg):
        return fallback(f"implausible angle between the estimated vectors ({spread:.1f} deg, "
                        f"accepted {cfg.min_spread_deg}-{cfg.max_spread_deg})")
    if dh > cfg.max_angle_deg or dd > cfg.max_angle_deg:
        return fallback(f"estimated vectors far from the expected hue (H {dh:.1f} deg, DAB {dd:.1f} deg; "
                        f"accepted {cfg.max_angle_deg})")
    m = hdab_matrix(h, dab)
    info.update(stain_vectors_source="estimated", fallback_reason=None,
                h=[float(x) for x in m[0]], dab=[float(x) for x in m[1]])
    return m, info


def haematoxylin_scale(patches: Sequence[np.ndarray], rgb_from_stains: np.ndarray, mpp: float, cfg: Any,
                       opaque_cfg: Any = None) -> tuple[float, dict[str, Any]]:
    """Factor that brings the slide's counterstain to a reference density.

    The nuclear counterstain level of the sample patches
    (:func:`marrowseg.analyzers.counterstain.nuclear_level`: the median over nucleus-like
    blobs of their ``level_percentile``) is scaled to ``h_reference_od``, clipped to
    ``[h_scale_min, h_scale_max]``: a pale or a heavy counterstain then meets the same
    nuclear thresholds. DAB has its own scale, from the membranes
    (:func:`marrowseg.analyzers.ecad.dab_level.dab_scale`).

    Parameters
    ----------
    patches : sequence of (H, W, 3) uint8 ndarray
        Sample patches at the analysis resolution.
    rgb_from_stains : (3, 3) ndarray
        The slide's stain matrix (haematoxylin first).
    mpp : float
        Pixel size of the patches, µm per pixel.
    cfg : ECadStainConfig
    opaque_cfg : TissueClassesConfig, optional
        Black fill and ink are left out.

    Returns
    -------
    scale : float
        1.0 when ``h_reference_od`` is null or too few nuclei were found.
    info : dict
        The level found, the blobs it came from and the factor used; ``h_scale_reason`` when
        scaling is off, ``h_scale_fallback_reason`` when too few nuclei were found.
    """
    if cfg.h_reference_od is None:
        return 1.0, {"h_scale": 1.0, "h_scale_reason": "off (ecad.stain.h_reference_od: null)"}
    h_from_od = np.linalg.inv(np.asarray(rgb_from_stains, np.float64))[:, 0]
    level, n = nuclear_level(patches, h_from_od, mpp, cfg, opaque_cfg)
    if level is None:
        # a fallback (the QA notebook flags it), where ``h_scale_reason`` above is a choice
        return 1.0, {"h_scale": 1.0, "h_level_blobs": n,
                     "h_scale_fallback_reason": f"counterstain not scaled: too few nucleus-like blobs in the "
                                                f"sample ({n} < {cfg.level_min_blobs})"}
    scale, clipped = stains.scale_to_reference(cfg.h_reference_od, level, cfg.h_scale_min, cfg.h_scale_max)
    return scale, {"h_level_od": level, "h_level_blobs": n, "h_scale": scale, "h_scale_clipped": clipped}


def stains_from_rgb(rgb_from_stains: np.ndarray, h_scale: float = 1.0, dab_scale: float = 1.0) -> np.ndarray:
    """Inverse stain matrix, indexed (rgb, stain), with the counterstain and DAB brought to their
    reference densities (:func:`haematoxylin_scale`, :func:`marrowseg.analyzers.ecad.dab_level.dab_scale`)."""
    inv = np.linalg.inv(np.asarray(rgb_from_stains, np.float64))
    inv[:, 0] *= float(h_scale)
    inv[:, 1] *= float(dab_scale)
    return inv


class ECadModule(torch.nn.Module):
    """``(B, 3, H, W)`` RGB 0..255 -> stain densities, nuclear maps and tissue maps.

    Outputs at the analysis resolution: ``h_od`` (counterstain), ``dab_od``, ``det_od``
    (the image nuclei are detected on: haematoxylin, plus DAB when the compartment is the
    nucleus), ``peak``, ``mask`` (B, 1, H, W); at the tissue-class resolution: ``bright``,
    ``h_ctx``, ``e_ctx`` (and ``clear_od`` with ``tissue.classes.clear_max_od_excess``).
    """

    def __init__(self, rgb_from_stains: np.ndarray, config: ECadConfig, *, h_scale: float = 1.0,
                 dab_scale: float = 1.0) -> None:
        super().__init__()
        inv = stains_from_rgb(rgb_from_stains, h_scale, dab_scale)
        # od = conc @ rgb_from_stains (row vectors), so conc = od @ inv: indexed (rgb, stain)
        self.register_buffer("rgb_to_stain", torch.as_tensor(inv, dtype=torch.float32))
        self.nuclear_dab = config.positivity_compartment == "nucleus"
        self.open_r = max(1, int(round(config.tissue.opening_um / config.mpp / 2)))
        self.nuclei = nuc.NucleusMaps(config.mpp, config.nuclei)
        self.tissue = tis.TissueMaps(config.mpp, config.tissue.classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        od = stains.od_from_rgb_torch(x.float())
        conc = torch.einsum("bchw,cs->bshw", od, self.rgb_to_stain.to(od.dtype))
        h = torch.clamp(conc[:, 0:1], min=0.0)
        dab = torch.clamp(conc[:, 1:2], min=0.0)
        det = h + dab if self.nuclear_dab else h
        out = {"h_od": h, "dab_od": dab, "det_od": det}
        out.update(self.nuclei(det))
        # counterstain split: even matrix stain (opening) vs nuclei (top-hat)
        matrix = filters.grey_opening(h, self.open_r)
        out.update(self.tissue(od.sum(dim=1, keepdim=True), torch.cat([h - matrix, matrix], dim=1)))
        return out
