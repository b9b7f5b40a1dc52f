"""E-cadherin IHC analyzer: erythroid left shift from membrane DAB on early precursors.

Dense step (torch, on the device): optical density, haematoxylin/DAB deconvolution with
vectors estimated per slide in :meth:`ECadAnalyzer.prepare` (Ruifrok H-DAB when the estimate
is unreliable), the smoothed maps of the nuclear detector and the pooled maps of the tissue
classes. Per tile (CPU): tissue labels (:mod:`marrowseg.analyzers.tissue`), nuclei and their
morphology classes (:mod:`marrowseg.analyzers.nuclei`, the same late-erythroid rules as
H&E), a DAB score per nucleus (membrane ring or nucleus), the positive call, and clusters
of positive cells. With ``negative_nuclei`` set, the nuclei found negative are detected a
second time with that detector (distance seeds split touching nuclei), while positive and
megakaryocyte nuclei keep their first region. With the membrane compartment, late-erythroid
calls must also pass the analyzer's own tests (:meth:`ECadAnalyzer._late_rules`: an OD that
rises with nuclear area, a pale rim, :func:`rim_density`, with enough pale pixels), E-cad+
cells whose nucleus the detector missed are added from their closed membrane
(:func:`ring_enclosed_cells`), and pale nuclei below the nuclear mask (myeloid nuclei, caps)
from their local contrast
(:func:`faint_nuclei`, cells that count in the nucleated total: ``other``, or late
erythroid when round, solid, even and dense enough, :meth:`ECadAnalyzer._late_faint`).
``finalize`` forms every ratio from the summed counts.

Clusters (sheets of positive cells, :func:`sheet_members` and :func:`count_clusters`) are
counted exactly once per slide: a tile reports the clusters whose lowest (row, col) member
lies in its core, built from the cells of the whole tile (halo included). That is exact for
clusters that fit in the halo (extent below about ``halo_um`` minus one link and one
neighbourhood); larger sheets may be cut by the tile edge and counted more than once, and the
tile then also counts them in ``n_ecad_clusters_truncated``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

from marrowseg import stains
from marrowseg.analyzers import filters
from marrowseg.analyzers import nuclei as nuc
from marrowseg.analyzers import tissue as tis
from marrowseg.analyzers.base import Analyzer, LabelClass, TileContext, TileResult
from marrowseg.analyzers.counterstain import nuclear_level
from marrowseg.analyzers.distance import nearest_label_band
from marrowseg.analyzers.nuclei import faint_nuclei
from marrowseg.config.ecad import ECadConfig, ECadReference, load_ecad_reference

__all__ = [
    "ECadAnalyzer",
    "ECadModule",
    "CELL_CLASSES",
    "hdab_matrix",
    "estimate_hdab_vectors",
    "haematoxylin_scale",
    "ring_scores",
    "ring_enclosed_cells",
    "unstained_part",
    "rim_density",
    "count_clusters",
    "sheet_members",
    "wilson_interval",
]

log = logging.getLogger(__name__)

#: values of the ``class`` column of cells.csv
CELL_CLASSES = ("ecad_pos", "late_erythroid", "megakaryocyte", "other")
_Z95 = 1.959963984540054  # two-sided 95% normal quantile
_MEAS_COLUMNS = ("area_um2", "eccentricity", "solidity", "h_od_mean", "h_od_cv")


# ----------------------------------------------------------------------------- stains
def hdab_matrix(h: np.ndarray | tuple, dab: np.ndarray | tuple) -> np.ndarray:
    """Haematoxylin/DAB stain matrix with an orthogonal residual row.

    Parameters
    ----------
    h, dab : (3,) array-like
        Stain OD vectors (RGB); normalised here.

    Returns
    -------
    rgb_from_stains : (3, 3) float64 ndarray
        Rows: H, DAB, and their normalised cross product. With an orthogonal residual the
        H and DAB concentrations are the least-squares fit of each pixel's OD in the H-DAB
        plane (:func:`marrowseg.stains.stain_matrix` folds the residual into the positive
        octant, which for H and DAB leaves it almost in their plane and the matrix
        ill-conditioned).
    """
    rows = stains.normalize_rows(np.vstack([np.asarray(h, np.float64), np.asarray(dab, np.float64)]))
    third = np.cross(rows[0], rows[1])
    return np.vstack([rows, third / np.linalg.norm(third)])


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) / np.linalg.norm(a)
    b = np.asarray(b, np.float64) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


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
    vecs, est = stains.estimate_two_stains(od, min_od=cfg.min_od, percentile=cfg.percentile, min_pixels=cfg.min_pixels)
    info["angle_spread_deg"] = est.get("angle_spread_deg")
    if vecs is None:
        return fallback("estimate impossible")
    # assign by angle to the standard vectors, not by the estimator's own order
    a = [[_angle_deg(v, standard[j]) for j in range(2)] for v in vecs]
    order = (0, 1) if a[0][0] + a[1][1] <= a[0][1] + a[1][0] else (1, 0)
    h, dab = vecs[order[0]], vecs[order[1]]
    spread = _angle_deg(h, dab)
    dh, dd = _angle_deg(h, standard[0]), _angle_deg(dab, standard[1])
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
    nuclear thresholds. DAB is not scaled: its absolute density is the measurement.

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
    raw = cfg.h_reference_od / level if level > 0 else cfg.h_scale_max
    scale = float(np.clip(raw, cfg.h_scale_min, cfg.h_scale_max))
    return scale, {"h_level_od": level, "h_level_blobs": n, "h_scale": scale, "h_scale_clipped": bool(scale != raw)}


# ----------------------------------------------------------------------------- dense
class ECadModule(torch.nn.Module):
    """``(B, 3, H, W)`` RGB 0..255 -> stain densities, nuclear maps and tissue maps.

    Outputs at the analysis resolution: ``h_od`` (counterstain), ``dab_od``, ``det_od``
    (the image nuclei are detected on: haematoxylin, plus DAB when the compartment is the
    nucleus), ``peak``, ``mask`` (B, 1, H, W); at the tissue-class resolution: ``bright``,
    ``h_ctx``, ``e_ctx``.
    """

    def __init__(self, rgb_from_stains: np.ndarray, config: ECadConfig, *, h_scale: float = 1.0) -> None:
        super().__init__()
        inv = np.linalg.inv(np.asarray(rgb_from_stains, np.float64))
        inv[:, 0] *= float(h_scale)  # counterstain brought to the reference density
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


# ----------------------------------------------------------------------------- per cell
def ring_scores(
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    dab_od: np.ndarray,
    mpp: float,
    *,
    gap_um: float,
    width_um: float,
    sectors: int,
    min_own_sectors: int | None = None,
) -> np.ndarray:
    """Membrane DAB score of each nucleus, from a ring just outside it.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Nucleus labels (0 background), as from :func:`marrowseg.analyzers.nuclei.detect_nuclei`.
    table : dict of (N,) ndarray
        Nucleus table (``label``, ``row``, ``col``).
    dab_od : (H, W) float32 ndarray
        DAB optical density.
    mpp : float
        µm per pixel.
    gap_um, width_um : float
        The ring covers distances ``(gap_um, gap_um + width_um]`` from the nucleus; each
        ring pixel belongs to its nearest nucleus and never lies inside another one.
    sectors : int
        Angular sectors around the centroid.
    min_own_sectors : int, optional
        With it, ring pixels on the border between two cells' territories (a pixel with a
        4-neighbour that belongs to another nucleus or to its ring) are left out of the
        sector peaks when the cell keeps at least this many sectors without them; fewer
        (a cell boxed in by neighbours) and all its ring pixels count. None: all count.

    Returns
    -------
    score_od : (N,) float64 ndarray
        Median over the ring's sectors of each sector's highest DAB OD; 0 for a nucleus
        without ring pixels. A membrane all round the cell scores high; a positive
        neighbour's membrane, covering a sector or two, does not.

    Notes
    -----
    Where two cells touch, one membrane line lies on the border of their territories and
    is seen by both rings: a negative cell in a sheet of positive ones would borrow its
    neighbours' membranes on more than half of its sectors. Left out, the border DAB no
    longer counts, and a cell is positive by the membrane on its own free sides (the twelve
    phantom tuning seeds < 24 at ratios 0.4-0.8: E-cad+ calls on myeloid, lymphocyte and
    late erythroid cells 516 -> 406, on E-cad+ cells 1454 -> 1447).
    """
    n = len(table["label"])
    if n == 0:
        return np.zeros(0, np.float64)
    _, rr, cc, owner = nearest_label_band(labels, gap_um / mpp, (gap_um + width_um) / mpp, wanted=table["label"])
    lut = np.full(int(labels.max()) + 1 if labels.size else 1, -1, np.int64)
    lut[table["label"]] = np.arange(n)
    idx = lut[owner]
    ok = idx >= 0
    rr, cc, idx = rr[ok], cc[ok], idx[ok]
    ang = np.arctan2(rr - table["row"][idx], cc - table["col"][idx])
    sec = np.minimum(((ang + np.pi) / (2 * np.pi) * sectors).astype(np.int64), sectors - 1)
    vals = dab_od[rr, cc].astype(np.float64)
    key = idx * sectors + sec
    peak = _sector_peaks(key, vals, n, sectors)
    if min_own_sectors is not None:
        own = ~_territory_border(labels, lut, rr, cc, idx)
        own_peak = _sector_peaks(key[own], vals[own], n, sectors)
        use = (~np.isnan(own_peak)).sum(axis=1) >= min_own_sectors
        peak[use] = own_peak[use]
    have = ~np.isnan(peak).all(axis=1)
    out = np.zeros(n, np.float64)
    if have.any():
        out[have] = np.nanmedian(peak[have], axis=1)
    return out


def ring_enclosed_cells(
    dab_od: np.ndarray,
    h_od: np.ndarray,
    mpp: float,
    taken_rc: np.ndarray,
    *,
    dab_min_od: float,
    sigma_um: float,
    min_area_um2: float,
    max_area_um2: float,
    min_h_od: float,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Cells enclosed by a closed DAB membrane that hold no detected nucleus.

    Parameters
    ----------
    dab_od, h_od : (H, W) float ndarray
        DAB and (scaled) haematoxylin OD.
    mpp : float
        µm per pixel.
    taken_rc : (N, 2) float ndarray
        (row, col) of the nuclei already detected, px: an enclosure holding one of them is
        that cell.
    dab_min_od : float
        DAB OD of a membrane pixel (after smoothing with ``sigma_um``).
    sigma_um : float
        Gaussian sigma of the DAB smoothing, µm (0: none).
    min_area_um2, max_area_um2 : float
        Area of an enclosure that is a cell, µm².
    min_h_od : float
        Mean haematoxylin OD inside the enclosure: a nucleus is in the section.
    allowed : (H, W) bool ndarray, optional
        Where cell centres may lie.

    Returns
    -------
    labels : (H, W) int32 ndarray
        The new cells' enclosures (0 elsewhere), numbered 1..M.
    table : dict of str to (M,) ndarray
        Nucleus-table columns (:data:`marrowseg.analyzers.nuclei.NUCLEUS_COLUMNS`) of the
        enclosures (area, shape and counterstain of the enclosed region).

    Notes
    -----
    The membrane stain marks the cell whatever the depth at which the section cuts it,
    while the nucleus of a cell cut near its pole is a small, faint cap that the nuclear
    detector misses (E-cad+ cells without a detection of their own: 32 % on tuning seeds
    12-23, 2,048 px). The enclosure is the background component of the membrane mask
    (4-connected) that does not touch the image edge.
    """
    h, w = dab_od.shape
    ds = cv2.GaussianBlur(np.asarray(dab_od, np.float32), (0, 0), sigma_um / mpp) if sigma_um > 0 else dab_od
    lab, n = ndi.label(ds < np.float32(dab_min_od))
    if n == 0:
        return np.zeros((h, w), np.int32), nuc.empty_table()
    ok = np.ones(n + 1, bool)
    ok[0] = False
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        ok[edge] = False
    cnt = np.bincount(lab.ravel(), minlength=n + 1)
    area = cnt * mpp * mpp
    hmean = np.bincount(lab.ravel(), weights=np.asarray(h_od, np.float64).ravel(), minlength=n + 1) / np.maximum(cnt, 1)
    ok &= (area >= min_area_um2) & (area <= max_area_um2) & (hmean >= min_h_od)
    rc = np.asarray(taken_rc, np.float64).reshape(-1, 2)
    if len(rc):
        r = np.clip(np.round(rc[:, 0]).astype(np.int64), 0, h - 1)
        c = np.clip(np.round(rc[:, 1]).astype(np.int64), 0, w - 1)
        ok[lab[r, c]] = False
        ok[0] = False
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        return np.zeros((h, w), np.int32), nuc.empty_table()
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    labels = lut[lab]
    _, table = nuc.measure_labels(labels, np.asarray(h_od, np.float32), mpp, 0.0)
    if allowed is not None:
        rr = np.clip(np.round(table["row"]).astype(np.int64), 0, h - 1)
        cc = np.clip(np.round(table["col"]).astype(np.int64), 0, w - 1)
        sel = np.asarray(allowed, bool)[rr, cc]
        table = {k: v[sel] for k, v in table.items()}
    return labels, table


def rim_density(
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    od: np.ndarray,
    mpp: float,
    *,
    inner_um: float,
    outer_um: float,
    quantile: float,
) -> np.ndarray:
    """Low quantile of a density just outside each nucleus, over its own territory.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Nucleus labels (0 background).
    table : dict of (N,) ndarray
        Nucleus table (``label``).
    od : (H, W) float ndarray
        Density to read (OD), e.g. haematoxylin + DAB.
    mpp : float
        µm per pixel.
    inner_um, outer_um : float
        The band covers background pixels at distances ``(inner_um, outer_um]`` from the
        nucleus (µm) whose nearest nucleus pixel belongs to it.
    quantile : float
        Quantile of ``od`` over the band, 0-1.

    Returns
    -------
    rim_od : (N,) float64 ndarray
        NaN for a nucleus without band pixels (boxed in by its neighbours).
    """
    return _rim_stats(labels, table, od, mpp, inner_um=inner_um, outer_um=outer_um, quantile=quantile)[0]


def _rim_stats(labels: np.ndarray, table: dict[str, np.ndarray], od: np.ndarray, mpp: float, *, inner_um: float,
               outer_um: float, quantile: float, pale_od: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rim_density` and the share of the band's pixels below ``pale_od`` (OD), from one band.

    Returns ``(rim_od, pale_share)``, (N,) float64 each; NaN for a nucleus without band
    pixels, and ``pale_share`` all NaN when ``pale_od`` is None.
    """
    n = len(table["label"])
    out = np.full(n, np.nan)
    pale = np.full(n, np.nan)
    if n == 0:
        return out, pale
    _, rr, cc, owner = nearest_label_band(labels, inner_um / mpp, outer_um / mpp, wanted=table["label"])
    lut = np.full(max(int(labels.max()), int(np.max(table["label"]))) + 1, -1, np.int64)
    lut[table["label"]] = np.arange(n)
    idx = lut[owner]
    ok = idx >= 0
    idx, vals = idx[ok], np.asarray(od, np.float64)[rr[ok], cc[ok]]
    if len(idx) == 0:
        return out, pale
    order = np.lexsort((vals, idx))
    idx, vals = idx[order], vals[order]
    cnt = np.bincount(idx, minlength=n)
    start = np.searchsorted(idx, np.arange(n))
    have = cnt > 0
    out[have] = vals[start[have] + np.minimum((cnt[have] * quantile).astype(np.int64), cnt[have] - 1)]
    if pale_od is not None:
        pale[have] = np.bincount(idx, weights=(vals < pale_od).astype(np.float64), minlength=n)[have] / cnt[have]
    return out, pale


def _sector_peaks(key: np.ndarray, vals: np.ndarray, n: int, sectors: int) -> np.ndarray:
    """(n, sectors) maximum of ``vals`` per ``key = cell * sectors + sector``; NaN where empty."""
    peak = np.full(n * sectors, -np.inf)
    np.maximum.at(peak, key, vals)  # per (cell, sector) maximum without a Python loop
    peak[np.bincount(key, minlength=n * sectors) == 0] = np.nan
    return peak.reshape(n, sectors)


def _territory_border(labels: np.ndarray, lut: np.ndarray, rr: np.ndarray, cc: np.ndarray,
                      idx: np.ndarray) -> np.ndarray:
    """Which ring pixels have a 4-neighbour owned by another cell (owner: the nucleus, or the ring it is in).

    Parameters
    ----------
    labels : (H, W) ndarray
        Nucleus labels (0 background).
    lut : ndarray
        Label -> table row (-1: not in the table).
    rr, cc, idx : (M,) ndarray
        Ring pixels and the row of the cell that owns each.

    Returns
    -------
    border : (M,) bool ndarray
        Looked up at the ring pixels' neighbours only, not over the tile.
    """
    h, w = labels.shape
    lut1 = (np.asarray(lut, np.int64) + 1).astype(np.int32)  # 0: nobody's (background, or a label not in the table)
    owner = lut1[labels]
    own = (np.asarray(idx) + 1).astype(np.int32)
    owner[rr, cc] = own
    border = np.zeros(len(rr), bool)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = rr + dr, cc + dc
        ok = np.flatnonzero((r >= 0) & (r < h) & (c >= 0) & (c < w))
        nb = owner[r[ok], c[ok]]
        border[ok] |= (nb != own[ok]) & (nb > 0)
    return border


def unstained_part(regions: np.ndarray, dab_od: np.ndarray, min_od: float, mpp: float,
                   sigma_um: float = 0.5) -> np.ndarray:
    """Pixels of ``regions`` outside their DAB-stained part.

    A nuclear stain (Ki67) colours the positive nucleus only; where the detector merged it with
    the pale nuclei it touches, those are the region's unstained pixels.

    Parameters
    ----------
    regions : (H, W) bool ndarray
        Nuclear regions found positive.
    dab_od : (H, W) float ndarray
        DAB optical density.
    min_od : float
        Stained: DAB, smoothed by a Gaussian of ``sigma_um``, at or above this OD.
    mpp : float
        µm per pixel.
    sigma_um : float
        Gaussian sigma of the smoothing, µm (speckled chromatin staining stays one part).

    Returns
    -------
    (H, W) bool ndarray
        Region pixels neither stained nor enclosed by stained pixels.
    """
    regions = np.asarray(regions, bool)
    smooth = cv2.GaussianBlur(np.asarray(dab_od, np.float32), (0, 0), sigma_um / float(mpp))
    stained = ndi.binary_fill_holes(regions & (smooth >= min_od))
    return regions & ~stained


def _region_means(values: np.ndarray, labels: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each label of ``label_ids`` (0 for an empty label)."""
    if len(label_ids) == 0:
        return np.zeros(0, np.float64)
    m = int(labels.max()) + 1
    at = np.flatnonzero(labels)  # the same sums in the same order, without the background's pixels
    lab = labels.ravel()[at]
    s = np.bincount(lab, weights=values.ravel()[at].astype(np.float64), minlength=m)
    c = np.bincount(lab, minlength=m)
    return s[label_ids] / np.maximum(c[label_ids], 1)


def count_clusters(
    rc_um: np.ndarray,
    *,
    link_um: float,
    min_extent_um: float,
) -> list[np.ndarray]:
    """Single-linkage clusters of points whose extent exceeds a size.

    Parameters
    ----------
    rc_um : (N, 2) float ndarray
        (row, col) positions, µm.
    link_um : float
        Points closer than this (<=) are linked.
    min_extent_um : float
        A cluster is kept when its largest pairwise distance exceeds this.

    Returns
    -------
    clusters : list of (k,) int64 ndarray
        Member indices of each kept cluster, sorted by the lowest (row, col) member.
    """
    pts = np.asarray(rc_um, np.float64).reshape(-1, 2)
    n = len(pts)
    if n < 2:
        return []
    pairs = cKDTree(pts).query_pairs(float(link_um), output_type="ndarray")
    if len(pairs) == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    out = []
    for c in np.unique(comp):
        members = np.flatnonzero(comp == c)
        if len(members) < 2:
            continue
        if float(pdist(pts[members]).max()) > min_extent_um:
            first = members[np.lexsort((pts[members, 1], pts[members, 0]))]
            out.append(first)
    out.sort(key=lambda m: (pts[m[0], 0], pts[m[0], 1]))
    return out


def sheet_members(rc_um: np.ndarray, positive: np.ndarray, *, radius_um: float, min_fraction: float) -> np.ndarray:
    """Positive cells that lie in a sheet: positive cells make up most of the cells around them.

    Parameters
    ----------
    rc_um : (N, 2) float ndarray
        (row, col) of every nucleated cell, µm.
    positive : (N,) bool ndarray
        E-cad+ calls.
    radius_um : float
        Neighbourhood radius, µm (the cell itself included).
    min_fraction : float
        Least share of positive cells among the cells of the neighbourhood.

    Returns
    -------
    (N,) bool ndarray
        Positive cells whose neighbourhood is at least ``min_fraction`` positive. An erythroid
        island of a reactive left shift mixes its positive cells with maturing and myeloid ones;
        a neoplastic sheet is positive throughout.
    """
    pts = np.asarray(rc_um, np.float64).reshape(-1, 2)
    positive = np.asarray(positive, bool)
    out = np.zeros(len(pts), bool)
    if not positive.any():
        return out
    tree = cKDTree(pts)
    near = tree.query_ball_point(pts[positive], float(radius_um), return_length=True)
    near_pos = cKDTree(pts[positive]).query_ball_point(pts[positive], float(radius_um), return_length=True)
    out[positive] = near_pos >= min_fraction * near
    return out


def _runs(idx: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Values of a non-decreasing index array and the [start, stop) range each one covers."""
    vals, starts = np.unique(idx, return_index=True)
    stops = np.append(starts[1:], len(idx))
    return vals, [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def wilson_interval(k: int, n: int, *, z: float = _Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``k / n``.

    Returns
    -------
    (low, high) or None
        None when ``n == 0``.

    References
    ----------
    Wilson E.B. "Probable inference, the law of succession, and statistical inference."
    J Am Stat Assoc 22(158):209-212, 1927.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    den = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    # exact ends at k = 0 and k = n (rounding would otherwise leave p just outside)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def _cluster_note(cfg: ECadConfig) -> str:
    """How the clusters were counted, in words, for the interpretation."""
    c = cfg.clusters
    sheet = (f"positive cells that are at least {c.min_positive_fraction:g} of the nucleated cells within "
             f"{c.neighbourhood_um:g} µm, " if c.neighbourhood_um is not None else "positive cells, ")
    exact = cfg.halo_um - c.link_um - (c.neighbourhood_um or 0.0)
    return (f"clusters of {sheet}linked within {c.link_um:g} µm, extent > {c.min_extent_um:g} µm; "
            f"exact up to an extent of about {exact:g} µm")


def _range_verdict(value: float | None, low: float | None, high: float | None) -> str | None:
    if value is None:
        return None
    if low is not None and value < low:
        return "below expected range"
    if high is not None and value > high:
        return "above expected range"
    return "within expected range"


# ----------------------------------------------------------------------------- analyzer
class ECadAnalyzer(Analyzer):
    """E-cadherin-positive early erythroid precursors and the erythroid left shift.

    Parameters
    ----------
    config : ECadConfig
        The ``ecad`` section of the configuration.
    """

    stain: ClassVar[str] = "ecad"
    map_names: ClassVar[tuple[str, ...]] = ("labels",)
    label_classes: ClassVar[tuple[LabelClass, ...]] = tis.LABEL_CLASSES
    cell_classes: ClassVar[tuple[LabelClass, ...]] = (
        LabelClass(1, "ecad_pos", (160, 80, 0)),
        LabelClass(2, "late_erythroid", (220, 30, 30)),
        LabelClass(3, "megakaryocyte", (30, 30, 220)),
        LabelClass(4, "other", (30, 180, 30)),
    )
    allow_amp: ClassVar[bool] = False  # OD thresholds near 0.15 do not survive float16 logs
    needs_colour: ClassVar[bool] = True
    # the membrane ring is 1 µm wide: Ki67 tiles resampled to 1.0 µm/px lose a quarter of their
    # detections (recall 0.71 -> 0.54, docs/validation.md); a 20x scan at ~0.5 µm/px is fine
    max_scan_mpp: ClassVar[float | None] = 0.6
    # 384 µm a side at 0.5 µm/px: ~100-700 nuclei a patch from fatty to packed marrow
    sample_patch_px: ClassVar[int] = 768
    # PSS with 1 and 4 tile workers at tile_px 1024 and 2048 (scripts/worker_memory.py, docs/validation.md)
    memory_model_mb: ClassVar[tuple[float, float, float, float]] = (440.0, 25.0, 50.0, 80.0)

    def __init__(self, config: ECadConfig, reference: ECadReference | None = None) -> None:
        super().__init__(config)
        self.rgb_from_stains = hdab_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)
        self.vectors_source = "standard"
        self.h_scale = 1.0
        self.k = tis.class_factor(config.mpp, config.tissue.classes.class_mpp)
        self.reference = reference if reference is not None else load_ecad_reference()

    @property
    def map_downsample(self) -> int:
        return self.k

    @property
    def window_um(self) -> float | None:
        return None if self.config.window_um is None else float(self.config.window_um)

    # -- dense ----------------------------------------------------------------------------
    def prepare(self, sample_rgb: np.ndarray, patches: Sequence[np.ndarray] = ()) -> dict[str, Any]:
        """Estimate the slide's H and DAB vectors (fallback: Ruifrok H-DAB, with the reason)
        from the sample's pixels, and its counterstain scale from the nuclei of ``patches``
        (none: no scaling)."""
        sample_rgb = tis.without_opaque(sample_rgb, self.config.tissue.classes)
        m, info = estimate_hdab_vectors(sample_rgb, self.config.stain)
        if info["stain_vectors_source"] == "standard" and self.config.stain.vectors == "estimate":
            log.warning("E-cadherin stain vectors: standard Ruifrok H-DAB used: %s", info["fallback_reason"])
        scale, sinfo = haematoxylin_scale(patches, m, float(self.config.mpp), self.config.stain,
                                          self.config.tissue.classes)
        info.update(sinfo)
        # the nuclear thresholds are absolute: an unscaled or clipped counterstain shifts every count
        if "h_scale_fallback_reason" in sinfo:
            log.warning("E-cadherin %s", sinfo["h_scale_fallback_reason"])
        elif sinfo.get("h_scale_clipped"):
            log.warning("E-cadherin counterstain scale clipped to %.2f (nuclear level %.2f OD)",
                        scale, sinfo["h_level_od"])
        self.rgb_from_stains = m
        self.h_scale = scale
        self.vectors_source = info["stain_vectors_source"]
        self._module = None
        return info

    def build_module(self) -> torch.nn.Module:
        return ECadModule(self.rgb_from_stains, self.config, h_scale=self.h_scale).eval()

    def reference_dense(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """The module's dense outputs for one tile in plain NumPy / SciPy (the peer baseline).

        Parameters
        ----------
        rgb : (H, W, 3) uint8 ndarray
            One tile, bright background.

        Returns
        -------
        dict of str to ndarray
            The keys of :class:`ECadModule`'s output, each float32 and shaped like it
            without the batch axis: ``(1, H, W)`` at the analysis resolution (``h_od``,
            ``dab_od``, ``det_od``, ``peak``, ``mask``), ``(1, ceil(H/k), ceil(W/k))`` at the
            tissue-class resolution (``bright``, ``h_ctx``, ``e_ctx``);
            ``post(reference_dense(rgb), rgb, ctx)`` works.

        Raises
        ------
        ValueError
            ``rgb`` is not (H, W, 3).

        Notes
        -----
        Uses the stain matrix and counterstain scale set by :meth:`prepare`. Gaussian blurs
        are ``scipy.ndimage.gaussian_filter`` (``mode="mirror"``, radius ``ceil(3 sigma)``,
        the module's padding and truncation); the matrix/nuclear split is
        ``scipy.ndimage.grey_opening`` with a square window and ``mode="nearest"`` (the
        module's replicate padding).
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb: expected an (H, W, 3) array, got shape {rgb.shape}")
        cfg = self.config
        mpp = float(cfg.mpp)
        od = stains.od_from_rgb(rgb)
        stains_from_rgb = np.linalg.inv(np.asarray(self.rgb_from_stains, np.float64))
        stains_from_rgb[:, 0] *= float(self.h_scale)
        conc = od @ stains_from_rgb.astype(np.float32)
        h = np.maximum(conc[..., 0], 0.0)
        dab = np.maximum(conc[..., 1], 0.0)
        det = h + dab if cfg.positivity_compartment == "nucleus" else h
        out = {"h_od": h, "dab_od": dab, "det_od": det}
        out.update(nuc.reference_maps(det, mpp, cfg.nuclei))
        w = 2 * max(1, int(round(cfg.tissue.opening_um / mpp / 2))) + 1
        matrix = ndi.grey_opening(h, size=(w, w), mode="nearest")
        out.update(tis.reference_maps(od.sum(axis=2), np.stack([h - matrix, matrix], axis=-1), mpp,
                                      cfg.tissue.classes))
        return {key: np.asarray(v, np.float32)[None] for key, v in out.items()}

    # -- per tile -------------------------------------------------------------------------
    def _geometry(self, ctx: TileContext, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Valid (inside-slide) and open-border masks at the class resolution."""
        k = self.k
        hc, wc = -(-shape[0] // k), -(-shape[1] // k)
        vr, vc = min(shape[0], int(ctx.valid_px[0])), min(shape[1], int(ctx.valid_px[1]))
        vrc, vcc = -(-vr // k), -(-vc // k)
        valid = np.zeros((hc, wc), bool)
        valid[:vrc, :vcc] = True
        border = np.zeros((hc, wc), bool)
        if ctx.origin_px[0] > 0:
            border[0, :] = True
        if ctx.origin_px[1] > 0:
            border[:, 0] = True
        if ctx.core[0].stop < vr:
            border[vrc - 1, :] = True
        if ctx.core[1].stop < vc:
            border[:, vcc - 1] = True
        return valid, border & valid

    def classify_cells(self, table: dict[str, np.ndarray], score_od: np.ndarray,
                       may_be_positive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Positive call and class of each nucleus.

        ``may_be_positive`` (N,) bool, optional: only these rows can be called positive
        (pieces of a region found negative as a whole stay negative).

        Returns
        -------
        positive : (N,) bool ndarray
            DAB score at or above the compartment's threshold.
        classes : (N,) object ndarray of str
            With the membrane compartment ``megakaryocyte`` by size first (megakaryocytes
            are E-cadherin negative; a neighbour's membrane must not relabel them), then
            ``ecad_pos``; with the nucleus compartment ``ecad_pos`` first (the score is the
            nucleus's own DAB, and large proliferating nuclei are stained), then the
            morphology class of the H&E rules (``late_erythroid`` or ``other``); for the
            membrane compartment with the E-cadherin analyzer's neighbour tests
            (:meth:`_late_caps`: crowded late calls, small caps).
        """
        cfg = self.config
        thr = cfg.membrane_min_dab_od if cfg.positivity_compartment == "membrane" else cfg.nucleus_min_dab_od
        positive = np.asarray(score_od) >= thr
        if may_be_positive is not None:
            positive &= np.asarray(may_be_positive, bool)
        morph = nuc.classify_nuclei(table, cfg.classes)
        if cfg.positivity_compartment == "membrane":
            classes = np.where(morph == "megakaryocyte", "megakaryocyte", np.where(positive, "ecad_pos", morph))
            classes = self._late_caps(table, classes.astype(object), self.mpp)
        else:  # a nucleus's own DAB: no neighbour can lend it, and a large stained nucleus is positive
            classes = np.where(positive, "ecad_pos", morph).astype(object)
        return positive & (classes == "ecad_pos"), classes

    def _scores(self, labels: np.ndarray, table: dict[str, np.ndarray], dab_od: np.ndarray,
                mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ring DAB, nuclear DAB and the score of the configured compartment, per nucleus (OD)."""
        cfg = self.config
        ring_od = ring_scores(labels, table, dab_od, mpp, gap_um=cfg.ring_gap_um,
                              width_um=cfg.ring_width_um, sectors=cfg.ring_sectors,
                              min_own_sectors=cfg.ring_min_own_sectors)
        nucleus_od = _region_means(dab_od, labels, table["label"])
        return ring_od, nucleus_od, (ring_od if cfg.positivity_compartment == "membrane" else nucleus_od)

    def _redetect_negatives(self, d: dict[str, np.ndarray], labels: np.ndarray, table: dict[str, np.ndarray],
                            score: np.ndarray, allowed: np.ndarray,
                            mpp: float) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Keep the positive and megakaryocyte nuclei of the first detection; detect the rest again.

        The negative cells (late normoblasts, myeloid cells, lymphocytes) are packed and
        touch; a detector that splits touching nuclei (``negative_nuclei``, distance seeds)
        finds more of them, but it would also cut the larger E-cad+ nuclei, whose count is
        the readout, and the lobes of a megakaryocyte: those keep their first region.

        Parameters
        ----------
        d : dict of str to (H, W) ndarray
            The tile's dense maps (``det_od``, ``peak``, ``mask``).
        labels, table : ndarray, dict
            The first detection (``cfg.nuclei``).
        score : (N,) ndarray
            DAB score of each first-detection nucleus, OD.
        allowed : (H, W) bool ndarray
            Where nucleus centres may lie.
        mpp : float
            µm/px.

        Returns
        -------
        labels : (H, W) int32 ndarray
            Kept regions and the new negative regions.
        table : dict of str to (M,) ndarray
            Their nucleus table (:data:`marrowseg.analyzers.nuclei.NUCLEUS_COLUMNS`).
        may_be_positive : (M,) bool ndarray
            Rows that are first-detection positive nuclei (the others were part of a region
            found negative as a whole).
        """
        cfg = self.config
        thr = cfg.membrane_min_dab_od if cfg.positivity_compartment == "membrane" else cfg.nucleus_min_dab_od
        old_pos = np.asarray(score) >= thr
        kept = old_pos | (nuc.classify_nuclei(table, cfg.classes) == "megakaryocyte")
        kept_mask = np.isin(labels, table["label"][kept])
        if cfg.positivity_compartment == "nucleus" and cfg.nucleus_stained_fraction is not None and old_pos.any():
            kept_mask &= ~unstained_part(np.isin(labels, table["label"][old_pos]), d["dab_od"],
                                         cfg.nucleus_stained_fraction * thr, mpp)
        ncfg = cfg.negative_nuclei
        same = (ncfg.peak_sigma_um == cfg.nuclei.peak_sigma_um) and (ncfg.mask_sigma_um == cfg.nuclei.mask_sigma_um)
        neg, _ = nuc.detect_nuclei(d["det_od"], mpp, ncfg, peak_map=d["peak"] if same else None,
                                   mask_map=d["mask"] if same else None, allowed=allowed & ~kept_mask)
        neg[kept_mask] = 0  # a new region's watershed may have spread into a kept one
        offset = int(neg.max())
        out = np.where(kept_mask, labels + offset, neg).astype(np.int32)
        out, new_table = nuc.measure_labels(out, d["det_od"], mpp, ncfg.min_area_um2)
        pos_by_old = np.zeros(int(labels.max()) + 1, bool)
        pos_by_old[table["label"][old_pos]] = True
        old_label = np.where(new_table["label"] > offset, new_table["label"] - offset, 0)
        return out, new_table, pos_by_old[old_label]

    def post(self, dense: dict[str, np.ndarray], rgb: np.ndarray, ctx: TileContext) -> TileResult:
        cfg = self.config
        mpp = float(ctx.mpp)
        k = self.k
        d = {key: np.asarray(v, dtype=np.float32).reshape(np.shape(v)[-2:]) for key, v in dense.items()}
        full = d["h_od"].shape
        vr = min(full[0], -(-int(ctx.valid_px[0]) // k) * k)
        vc = min(full[1], -(-int(ctx.valid_px[1]) // k) * k)
        for key, v in d.items():
            d[key] = v[:vr, :vc] if v.shape == full else v[: vr // k, : vc // k]
        shape = d["h_od"].shape
        valid_c, border_c = self._geometry(ctx, shape)
        # black fill and marker ink: outside the section, and no stain
        valid_c, border_c = tis.exclude_opaque(rgb[:vr, :vc], k, cfg.tissue.classes, valid_c, border_c, d,
                                               ("det_od", "h_od", "dab_od", "peak", "mask"))
        labels_c, _ = tis.classify_tissue(d["bright"], d["h_ctx"], d["e_ctx"], mpp * k, cfg.tissue.classes,
                                          valid=valid_c, open_border=border_c)
        labels = tis.upsample_labels(labels_c, k, shape)
        core_labels = labels[ctx.core]
        counts = np.bincount(core_labels.ravel(), minlength=4)
        stats: dict[str, float] = {
            "excluded_px": int(counts[tis.EXCLUDED]),
            "haematopoietic_px": int(counts[tis.HAEMATOPOIETIC]),
            "fat_px": int(counts[tis.FAT]),
            "bone_px": int(counts[tis.BONE]),
        }

        allowed = (labels == tis.HAEMATOPOIETIC) | (labels == tis.FAT)
        nuc_labels, table = nuc.detect_nuclei(d["det_od"], mpp, cfg.nuclei, peak_map=d["peak"],
                                              mask_map=d["mask"], allowed=allowed)
        ring_od, nucleus_od, score = self._scores(nuc_labels, table, d["dab_od"], mpp)
        may_be_positive = None
        if cfg.negative_nuclei is not None and len(table["label"]):
            nuc_labels, table, may_be_positive = self._redetect_negatives(d, nuc_labels, table, score, allowed, mpp)
            ring_od, nucleus_od, score = self._scores(nuc_labels, table, d["dab_od"], mpp)
        positive, classes = self.classify_cells(table, score, may_be_positive)
        if cfg.positivity_compartment == "membrane":
            classes = self._late_rules(d, nuc_labels, table, classes, mpp)
        hole_labels = None
        if cfg.positivity_compartment == "membrane" and cfg.ring_holes is not None:
            table, classes, positive, ring_od, nucleus_od, hole_labels = self._add_ring_enclosed(
                d, table, classes, positive, ring_od, nucleus_od, allowed, mpp)
        if cfg.faint_nuclei is not None:  # either compartment: pale nuclei are nucleated cells too
            table, classes, positive, ring_od, nucleus_od = self._add_faint(
                d, nuc_labels, hole_labels, table, classes, positive, ring_od, nucleus_od,
                labels == tis.HAEMATOPOIETIC, mpp)

        keep = ctx.in_core(table["row"], table["col"])
        cells = {"row": table["row"][keep], "col": table["col"][keep], "class": classes[keep].astype(str),
                 "dab_ring_od": ring_od[keep], "dab_nucleus_od": nucleus_od[keep]}
        for c in _MEAS_COLUMNS:
            cells[c] = table[c][keep]
        stats["n_nucleated"] = int(keep.sum())
        for name in CELL_CLASSES:
            stats[f"n_{name}"] = int((classes[keep] == name).sum())

        n_cl, n_trunc, member = self._clusters(table, positive, ctx, shape)
        cells["ecad_cluster"] = member[keep].astype(np.int8)
        stats["n_ecad_clusters"] = n_cl
        stats["n_ecad_clusters_truncated"] = n_trunc
        windows = self._windows(core_labels, cells, ctx) if cfg.window_um is not None else {}
        return TileResult(stats=stats, maps={"labels": self._map(labels, ctx)}, cells=cells, windows=windows)

    def _late_rules(self, d: dict[str, np.ndarray], labels: np.ndarray, table: dict[str, np.ndarray],
                    classes: np.ndarray, mpp: float) -> np.ndarray:
        """The E-cadherin analyzer's own late-erythroid tests on top of the shared rules.

        A late-erythroid call (``classes.late_erythroid_*``, the H&E rules) stays one only if
        (a) its mean counterstain reaches ``late_erythroid_min_od`` plus
        ``late_erythroid_od_per_um2`` per µm² above ``late_erythroid_min_area_um2`` (the smaller
        the nucleus, the paler it may be: a section through a late normoblast's pole is a
        small, faint cap, while a small lymphocyte's nucleus is as dense but larger), and
        (b) its rim is pale (:func:`rim_density` at most ``late_rim.max_od``, less
        ``late_rim.od_per_um2`` per µm² above ``late_erythroid_min_area_um2``: the larger late
        calls are mostly lymphocytes) and, with ``late_rim.pale_od``, at least
        ``late_rim.pale_share_per_um2`` per µm² above ``late_erythroid_min_area_um2`` of the
        band's pixels are paler than ``pale_od`` (a lymphocyte's scant cytoplasm leaves little
        pale rim, the more so the larger the nucleus): otherwise ``other``. Small caps called late by
        :meth:`_late_caps` (below ``late_erythroid_min_area_um2``) have their own tests and are
        left as they are.
        """
        cfg = self.config
        late = (classes == "late_erythroid") & (
            np.asarray(table["area_um2"], np.float64) >= cfg.classes.late_erythroid_min_area_um2)
        classes = classes.copy()
        slope = cfg.late_erythroid_od_per_um2
        if slope and late.any():
            need = cfg.classes.late_erythroid_min_od + slope * (table["area_um2"] - cfg.classes.late_erythroid_min_area_um2)
            classes[late & (table["h_od_mean"] < need)] = "other"
            late &= classes == "late_erythroid"
        rim_cfg = cfg.late_rim
        if rim_cfg is not None and late.any():
            sub = {"label": table["label"][late]}
            rim, pale = _rim_stats(labels, sub, d["h_od"] + d["dab_od"], mpp, inner_um=rim_cfg.inner_um,
                                   outer_um=rim_cfg.outer_um, quantile=rim_cfg.quantile, pale_od=rim_cfg.pale_od)
            above = np.asarray(table["area_um2"], np.float64)[late] - cfg.classes.late_erythroid_min_area_um2
            max_od = rim_cfg.max_od - rim_cfg.od_per_um2 * above
            classes[np.flatnonzero(late)[rim > max_od]] = "other"  # NaN (no rim: boxed in) stays late
            if rim_cfg.pale_od is not None:
                classes[np.flatnonzero(late)[pale < rim_cfg.pale_share_per_um2 * above]] = "other"  # NaN stays
        return classes

    def _late_caps(self, table: dict[str, np.ndarray], classes: np.ndarray, mpp: float) -> np.ndarray:
        """Late-erythroid calls from a nucleus' nearest neighbour: crowded calls and small caps.

        A late normoblast's pyknotic nucleus sits alone in a cell 7-10 µm across, so the nearest
        other nucleus lies several µm away, while a profile with a nucleus within ~5 µm that is
        paler than a pyknotic nucleus or elongated is mostly a lobe of a myeloid nucleus
        (``late_crowded``: such late calls become ``other``). A section near the pole of the
        round nucleus is a small, even, round disc: ``other`` nuclei below
        ``classes.late_erythroid_min_area_um2`` that are dense enough
        (``classes.late_erythroid_min_od``), even, round and far from other nuclei
        (``late_caps``) become ``late_erythroid``. Runs before :meth:`_late_rules`, whose tests
        leave the caps alone (a cap's rim holds its own blurred edge).

        Parameters
        ----------
        table : dict of (N,) ndarray
            The detected nuclei of the tile, halo included (``row``, ``col`` px; ``area_um2``,
            ``eccentricity``, ``h_od_mean``, ``h_od_cv``). They alone are the neighbours: the
            pale nuclei and membrane-enclosed cells found later do not change the late calls.
        classes : (N,) object ndarray of str
        mpp : float
            µm per pixel.

        Returns
        -------
        classes : (N,) object ndarray of str
            A new array; ``ecad_pos`` and ``megakaryocyte`` are kept.
        """
        cfg = self.config
        caps, crowd = cfg.late_caps, cfg.late_crowded
        n = len(classes)
        if n == 0 or (caps is None and crowd is None):
            return classes
        classes = classes.copy()
        nn = np.full(n, np.inf)
        if n > 1:
            rc = np.column_stack([table["row"], table["col"]]).astype(np.float64)
            dist, _ = cKDTree(rc).query(rc, k=2)
            nn = dist[:, 1] * mpp
        area = np.asarray(table["area_um2"], np.float64)
        ecc = np.asarray(table["eccentricity"], np.float64)
        od = np.asarray(table["h_od_mean"], np.float64)
        other = classes == "other"
        if crowd is not None:
            lobe = (nn < crowd.spacing_um) & ((od < crowd.min_od) | (ecc > crowd.max_eccentricity))
            classes[(classes == "late_erythroid") & lobe] = "other"
        if caps is not None:
            cap = (other & (area >= caps.min_area_um2) & (area < cfg.classes.late_erythroid_min_area_um2)
                   & (nn >= caps.min_spacing_um) & (np.asarray(table["h_od_cv"], np.float64) <= caps.max_od_cv)
                   & (ecc <= caps.max_eccentricity) & (od >= cfg.classes.late_erythroid_min_od))
            classes[cap] = "late_erythroid"
        return classes

    def _late_faint(self, ft: dict[str, np.ndarray]) -> np.ndarray:
        """Class of each pale nucleus of the faint pass: ``late_erythroid`` or ``other``.

        A section near the pole of a late normoblast's round pyknotic nucleus can fall below
        the nuclear mask; it stays a round, solid, even disc, denser than the open chromatin
        of a myeloid nucleus (``late_faint``; null: all ``other``).

        Parameters
        ----------
        ft : dict of (M,) ndarray
            The faint pass' nucleus table (``area_um2`` µm², ``eccentricity``, ``solidity``,
            ``h_od_mean`` OD, ``h_od_cv``).

        Returns
        -------
        classes : (M,) object ndarray of str
        """
        lf = self.config.late_faint
        out = np.full(len(ft["label"]), "other", dtype=object)
        if lf is None:
            return out
        area = np.asarray(ft["area_um2"], np.float64)
        late = ((area >= lf.min_area_um2) & (area <= lf.max_area_um2)
                & (np.asarray(ft["eccentricity"], np.float64) <= lf.max_eccentricity)
                & (np.asarray(ft["solidity"], np.float64) >= lf.min_solidity)
                & (np.asarray(ft["h_od_cv"], np.float64) <= lf.max_od_cv)
                & (np.asarray(ft["h_od_mean"], np.float64) >= lf.min_od))
        out[late] = "late_erythroid"
        return out

    def _add_ring_enclosed(self, d: dict[str, np.ndarray], table: dict[str, np.ndarray], classes: np.ndarray,
                           positive: np.ndarray, ring_od: np.ndarray, nucleus_od: np.ndarray, allowed: np.ndarray,
                           mpp: float) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                np.ndarray]:
        """Append the E-cad+ cells found by their membrane alone (:func:`ring_enclosed_cells`).

        An enclosure must also score positive on its own ring (the membrane all round it),
        so a gap between negative cells closed off by the membranes of positive neighbours
        is not a cell.
        """
        cfg = self.config
        rh = cfg.ring_holes
        hl, ht = ring_enclosed_cells(
            d["dab_od"], d["h_od"], mpp, np.column_stack([table["row"], table["col"]]),
            dab_min_od=rh.dab_min_od, sigma_um=rh.sigma_um, min_area_um2=rh.min_area_um2,
            max_area_um2=rh.max_area_um2, min_h_od=rh.min_h_od, allowed=allowed)
        h_ring = ring_scores(hl, ht, d["dab_od"], mpp, gap_um=cfg.ring_gap_um, width_um=cfg.ring_width_um,
                             sectors=cfg.ring_sectors)
        ok = h_ring >= cfg.membrane_min_dab_od
        hl = np.where(np.isin(hl, ht["label"][ok]), hl, 0)
        ht = {k: v[ok] for k, v in ht.items()}
        n_new = int(ok.sum())
        table = {k: np.concatenate([np.asarray(table[k]), ht[k].astype(np.asarray(table[k]).dtype)]) for k in table}
        classes = np.concatenate([classes, np.full(n_new, "ecad_pos", dtype=object)])
        positive = np.concatenate([positive, np.ones(n_new, bool)])
        ring_od = np.concatenate([ring_od, h_ring[ok]])
        nucleus_od = np.concatenate([nucleus_od, _region_means(d["dab_od"], hl, ht["label"])])
        return table, classes, positive, ring_od, nucleus_od, hl

    def _add_faint(self, d: dict[str, np.ndarray], nuc_labels: np.ndarray, hole_labels: np.ndarray | None,
                   table: dict[str, np.ndarray], classes: np.ndarray, positive: np.ndarray, ring_od: np.ndarray,
                   nucleus_od: np.ndarray, marrow: np.ndarray,
                   mpp: float) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Append the pale nuclei below the nuclear mask (:func:`faint_nuclei`): ``other`` or late-erythroid cells.

        Only in haematopoietic tissue, away from the nuclei and the membrane-enclosed cells
        already found. They are never E-cad+ (an E-cad+ cell whose nucleus is a faint cap is
        found by its closed membrane), and late erythroid only by :meth:`_late_faint`
        (``late_faint``: round, solid, even and not too pale). Scoring them on their
        own ring took the E-cad+ count error mean from 0.069 to 0.161 (tuning seeds 0-11,
        2,048 px); calling the round, small, dense-enough ones with a pale rim late erythroid
        took the ratio error max from 0.082 to 0.091-0.099 and the late max from 0.58 to
        0.73-0.79 (seeds 0-23). The membrane ring is still measured (``dab_ring_od`` in
        cells.csv).
        """
        cfg = self.config
        fc = cfg.faint_nuclei
        taken = nuc_labels != 0
        if hole_labels is not None:
            taken |= hole_labels != 0
        fl, ft = faint_nuclei(d["mask"], d["peak"], d["h_od"], mpp, taken, background_um=fc.background_um,
                              contrast_od=fc.contrast_od, gap_um=fc.gap_um,
                              min_radius_um=fc.min_radius_um, min_distance_um=fc.min_distance_um,
                              min_area_um2=fc.min_area_um2, max_area_um2=fc.max_area_um2, allowed=marrow,
                              max_background_od=fc.max_background_od, max_eccentricity=fc.max_eccentricity)
        n_new = len(ft["label"])
        if n_new == 0:
            return table, classes, positive, ring_od, nucleus_od
        offset = int(nuc_labels.max())
        both = np.where(fl > 0, fl + offset, nuc_labels).astype(np.int32)
        ft = dict(ft, label=ft["label"] + offset)
        f_ring = ring_scores(both, ft, d["dab_od"], mpp, gap_um=cfg.ring_gap_um, width_um=cfg.ring_width_um,
                             sectors=cfg.ring_sectors, min_own_sectors=cfg.ring_min_own_sectors)
        table = {k: np.concatenate([np.asarray(table[k]), ft[k].astype(np.asarray(table[k]).dtype)]) for k in table}
        classes = np.concatenate([classes, self._late_faint(ft)])
        positive = np.concatenate([positive, np.zeros(n_new, bool)])
        ring_od = np.concatenate([ring_od, f_ring])
        nucleus_od = np.concatenate([nucleus_od, _region_means(d["dab_od"], both, ft["label"])])
        return table, classes, positive, ring_od, nucleus_od

    def _clusters(self, table: dict[str, np.ndarray], positive: np.ndarray, ctx: TileContext,
                  shape: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        """Clusters owned by this tile (lowest member in the core), how many touch a cut edge, and
        which rows of ``table`` belong to any counted cluster (owned here or not)."""
        cfg = self.config.clusters
        mpp = float(ctx.mpp)
        if cfg.neighbourhood_um is not None:
            positive = sheet_members(np.column_stack([table["row"], table["col"]]) * mpp, positive,
                                     radius_um=cfg.neighbourhood_um, min_fraction=cfg.min_positive_fraction)
        idx = np.flatnonzero(positive)
        rows, cols = table["row"][idx], table["col"][idx]
        clusters = count_clusters(np.column_stack([rows, cols]) * mpp, link_um=cfg.link_um,
                                  min_extent_um=cfg.min_extent_um)
        member = np.zeros(len(table["row"]), bool)
        if not clusters:
            return 0, 0, member
        member[idx[np.concatenate(clusters)]] = True
        edge_px = cfg.link_um / mpp
        # edges where the tile cuts the slide (a cluster there may continue beyond the tile)
        cut_top, cut_left = ctx.origin_px[0] > 0, ctx.origin_px[1] > 0
        cut_bottom = ctx.core[0].stop < min(shape[0], ctx.valid_px[0])
        cut_right = ctx.core[1].stop < min(shape[1], ctx.valid_px[1])
        n = n_trunc = 0
        for m in clusters:
            if not ctx.in_core(rows[m[:1]], cols[m[:1]])[0]:
                continue
            n += 1
            r, c = rows[m], cols[m]
            if ((cut_top and r.min() < edge_px) or (cut_left and c.min() < edge_px)
                    or (cut_bottom and r.max() > shape[0] - edge_px) or (cut_right and c.max() > shape[1] - edge_px)):
                n_trunc += 1
        return n, n_trunc, member

    def _map(self, labels: np.ndarray, ctx: TileContext) -> np.ndarray:
        """The core's labels on the slide-aligned grid of every k-th analysis pixel."""
        k = self.k
        r0, c0 = ctx.core_origin_px
        core = labels[ctx.core]
        return np.ascontiguousarray(core[(-r0) % k :: k, (-c0) % k :: k])

    def _windows(self, core_labels: np.ndarray, cells: dict[str, np.ndarray], ctx: TileContext) -> dict:
        mpp = float(ctx.mpp)
        win = float(self.config.window_um)
        r0, c0 = ctx.core_origin_px
        h, w = core_labels.shape
        wr = np.floor((r0 + np.arange(h)) * mpp / win).astype(np.int64)
        wc = np.floor((c0 + np.arange(w)) * mpp / win).astype(np.int64)
        cr = np.floor((ctx.origin_px[0] + np.floor(cells["row"])) * mpp / win).astype(np.int64)
        cc = np.floor((ctx.origin_px[1] + np.floor(cells["col"])) * mpp / win).astype(np.int64)
        cls = cells["class"]
        out: dict[tuple[int, int], dict[str, float]] = {}
        # window indices grow with the pixel index: each window is a contiguous block (a view)
        for i, (ra, rb) in zip(*_runs(wr), strict=True):
            for j, (ca, cb) in zip(*_runs(wc), strict=True):
                n = np.bincount(core_labels[ra:rb, ca:cb].ravel(), minlength=4)
                inwin = (cr == i) & (cc == j)
                out[(int(i), int(j))] = {
                    "haematopoietic_px": int(n[tis.HAEMATOPOIETIC]),
                    "n_nucleated": int(inwin.sum()),
                    "n_ecad_pos": int((inwin & (cls == "ecad_pos")).sum()),
                    "n_late_erythroid": int((inwin & (cls == "late_erythroid")).sum()),
                }
        return out

    # -- slide ----------------------------------------------------------------------------
    def finalize(
        self,
        totals: dict[str, float],
        windows: dict[tuple[int, int], dict[str, float]],
        *,
        age: float | None = None,
    ) -> dict[str, Any]:
        cfg = self.config
        px_um2 = float(cfg.mpp) ** 2
        g = lambda key: float(totals.get(key, 0))  # noqa: E731
        haem_um2 = g("haematopoietic_px") * px_um2
        n_cells = int(g("n_nucleated"))
        n_pos = int(g("n_ecad_pos"))
        n_late = int(g("n_late_erythroid"))
        n_ery = n_pos + n_late

        def ratio(a: float, b: float, scale: float = 1.0) -> float | None:
            return None if b <= 0 else float(a / b * scale)

        ci = wilson_interval(n_pos, n_ery)
        per100 = ratio(n_pos, n_cells, 100.0)
        lsr = ratio(n_pos, n_ery)
        n_clusters = int(g("n_ecad_clusters"))
        readouts: dict[str, Any] = {
            "nucleated_cells": n_cells,
            "ecad_pos_cells": n_pos,
            "ecad_pos_per_100_nucleated": per100,
            "ecad_pos_per_mm2": ratio(n_pos, haem_um2, 1e6),
            "late_erythroid_cells": n_late,
            "left_shift_ratio": lsr,
            "left_shift_ratio_ci95": None if ci is None else [ci[0], ci[1]],
            "ecad_pos_clusters": n_clusters,
            "megakaryocytes_per_mm2": ratio(g("n_megakaryocyte"), haem_um2, 1e6),
            "nucleated_cells_per_mm2": ratio(n_cells, haem_um2, 1e6),
        }
        ref = self.reference
        icfg = cfg.interpretation
        if lsr is None or n_ery < icfg.min_erythroid_cells:
            shift = "insufficient erythroid cells"
        elif lsr > icfg.left_shift_ratio_high:
            shift = "left-shifted erythropoiesis"
        else:
            shift = "no left shift"
        r100 = ref.ecad_pos_per_100_nucleated
        interpretation = {
            "ecad_pos_per_100_nucleated": {
                "value": per100, "low": r100.low, "high": r100.high, "unit": r100.unit,
                "verdict": _range_verdict(per100, r100.low, r100.high), "source": r100.source,
            },
            "left_shift": {
                "value": lsr, "threshold": icfg.left_shift_ratio_high, "min_erythroid_cells": icfg.min_erythroid_cells,
                "erythroid_cells": n_ery, "verdict": shift, "source": ref.left_shift_ratio.source,
            },
            "clusters": {
                "value": n_clusters, "alert_count": icfg.cluster_alert_count,
                "flag": n_clusters >= icfg.cluster_alert_count,
                "truncated": int(g("n_ecad_clusters_truncated")),
                "note": _cluster_note(cfg),
                "source": ref.ecad_pos_clusters.source,
            },
        }
        win = [v for v in windows.values() if v.get("n_nucleated", 0) > 0]
        out = {
            "readouts": readouts,
            "areas_um2": {
                "haematopoietic": haem_um2,
                "fat": g("fat_px") * px_um2,
                "bone": g("bone_px") * px_um2,
                "excluded": g("excluded_px") * px_um2,
            },
            "counts": {name: int(g(f"n_{name}")) for name in CELL_CLASSES}
            | {"ecad_clusters_truncated": int(g("n_ecad_clusters_truncated"))},
            "interpretation": interpretation,
            "stain_vectors_source": self.vectors_source,
            "positivity_compartment": cfg.positivity_compartment,
            "measurements": {"n_windows_with_cells": len(win)},
        }
        for v in readouts.values():
            if isinstance(v, float) and not math.isfinite(v):
                raise AssertionError("non-finite readout")  # ratios guard their denominators
        return out
