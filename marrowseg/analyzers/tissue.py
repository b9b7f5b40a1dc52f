"""Tissue classes of a marrow section: haematopoietic, fat, bone, excluded.

Pure functions usable for H&E and, with the haematoxylin-only counterstain of an IHC
slide, for E-cadherin (pass the counterstain as ``h_ctx`` and the eosin-like matrix
density, or zeros, as ``e_ctx``).

Method, at ``class_mpp`` (about 1 µm/px: fat membranes are 1-2 µm, a fat space 30-120 µm)::

    bright   = summed RGB OD < bright_max_od        (min-pooled: a thin membrane keeps a space closed)
    bright outside the tissue outline (tissue closed by envelope_um) -> glass (excluded);
        with envelope_fat, bright walled in by tissue (reaching no tile or slide edge) is inside
    with stained_closing_um (IHC), bright gaps the closing of the stained pixels fills are tissue
    each 4-connected bright region inside the outline:
        equivalent diameter < fat_min_diameter_um   -> a hole in the tissue around it
        touches an interior tile border              -> open, large: background (excluded)
        diameter > fat_max_diameter_um or solidity < fat_min_solidity:
            with fat_split_um, cut at necks (distance-transform watershed) and judge each piece
            otherwise                                -> background / tear (excluded)
        otherwise                                    -> fat (one adipocyte)
        with envelope_fat, a space bordering the glass the outline cut off gets back the glass
            inside its convex hull (the bite of the closing disk into a peripheral adipocyte)
    tissue (not bright): bone where the local eosin is high and the local haematoxylin low,
        opened and size-filtered; haematopoietic otherwise
    membranes: closing of fat by membrane_um gives the thin septa between spaces to fat;
        with fat_rim_um, haematopoietic pixels that close to fat are its membrane (fat)

The newer keys (envelope_fat, fat_split_um, fat_rim_um, stained_closing_um) are optional and off
by default; he.yaml sets the first three, ecad.yaml all four.

The enclosure test needs context: a region whose core part lies within the tile's core can
reach the tile border only if it is at least as wide as the halo. With the halo at least the
largest fat diameter, every region that touches an interior border is wider than any fat
space, so it is background; regions cut by the slide edge are judged by size alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
from skimage.morphology import convex_hull_image, disk, h_maxima
from skimage.segmentation import watershed

from marrowseg import stains
from marrowseg.analyzers.base import LabelClass
from marrowseg.analyzers.distance import distance_to_background, nearest_feature
from marrowseg.analyzers.morphology import binary_closing, binary_opening
from marrowseg.analyzers.nuclei import gaussian_blur_torch, gaussian_reference

__all__ = [
    "LABEL_CLASSES",
    "EXCLUDED",
    "HAEMATOPOIETIC",
    "FAT",
    "BONE",
    "TISSUE_CLASS_NAMES",
    "class_factor",
    "block_mean",
    "TissueMaps",
    "FatObjects",
    "classify_tissue",
    "upsample_labels",
    "reference_maps",
]

EXCLUDED, HAEMATOPOIETIC, FAT, BONE = 0, 1, 2, 3

#: names and display colours of the tissue label map (H&E and IHC counterstain)
LABEL_CLASSES = (
    LabelClass(EXCLUDED, "excluded", (0, 0, 0)),
    LabelClass(HAEMATOPOIETIC, "haematopoietic", (200, 40, 120)),
    LabelClass(FAT, "fat", (250, 230, 140)),
    LabelClass(BONE, "bone", (120, 170, 230)),
)
TISSUE_CLASS_NAMES = {EXCLUDED: "excluded", HAEMATOPOIETIC: "haematopoietic", FAT: "fat", BONE: "bone"}


def class_factor(mpp: float, class_mpp: float) -> int:
    """Integer downsampling factor from the analysis pixels to the tissue-class pixels (>= 1)."""
    return max(1, int(round(float(class_mpp) / float(mpp))))


def _pad_to_multiple(x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x


class TissueMaps(torch.nn.Module):
    """Dense step of the tissue classes.

    Input: summed RGB OD ``(B, 1, H, W)`` and stain densities ``(B, 2, H, W)``
    (haematoxylin, eosin) at the analysis resolution. Output at the class resolution
    ``ceil(H / k) x ceil(W / k)``: ``bright`` (1.0 where every analysis pixel of the
    class pixel is unstained), ``h_ctx`` and ``e_ctx`` (local mean densities); with
    ``clear_max_od_excess`` set, ``clear_od`` (mean summed OD of each class pixel, for
    :func:`classify_tissue`'s pale-region test).
    """

    def __init__(self, mpp: float, cfg: Any) -> None:
        super().__init__()
        self.k = class_factor(mpp, cfg.class_mpp)
        self.class_mpp = mpp * self.k
        self.bright_sigma_px = float(cfg.bright_sigma_um) / float(mpp)
        self.context_sigma_px = float(cfg.context_sigma_um) / self.class_mpp
        self.bright_max_od = float(cfg.bright_max_od)
        self.clear_od = getattr(cfg, "clear_max_od_excess", None) is not None

    def forward(self, od_sum: torch.Tensor, he: torch.Tensor) -> dict[str, torch.Tensor]:
        k = self.k
        smooth = gaussian_blur_torch(od_sum, self.bright_sigma_px)
        stained = (smooth >= self.bright_max_od).to(od_sum.dtype)
        stained = _pad_to_multiple(stained, k, "replicate")
        # max-pool of "stained" = min-pool of "bright": a membrane of one analysis pixel survives
        bright = 1.0 - F.max_pool2d(stained, k) if k > 1 else 1.0 - stained
        dens = F.avg_pool2d(_pad_to_multiple(he, k, "replicate"), k) if k > 1 else he
        dens = gaussian_blur_torch(torch.clamp(dens, min=0.0), self.context_sigma_px)
        out = {"bright": bright, "h_ctx": dens[:, 0:1], "e_ctx": dens[:, 1:2]}
        if self.clear_od:
            out["clear_od"] = F.avg_pool2d(_pad_to_multiple(od_sum, k, "replicate"), k) if k > 1 else od_sum
        return out


def _block_reduce_edge(img: np.ndarray, k: int, fn) -> np.ndarray:
    """``fn`` over k x k blocks of an (H, W, ...) array, edge-padded to a multiple of ``k``."""
    h, w = img.shape[:2]
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        img = np.pad(img, [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2), mode="edge")
    hh, ww = img.shape[0] // k, img.shape[1] // k
    return fn(img.reshape(hh, k, ww, k, *img.shape[2:]), axis=(1, 3))


def block_mean(img: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k`` x ``k`` blocks, edge-padded to a multiple of ``k`` as :func:`_block_reduce_edge`
    (the class grid), by OpenCV's area resize (uint8 or float32, one or more channels; same dtype)."""
    img = np.ascontiguousarray(img)
    if k <= 1:
        return img
    h, w = img.shape[:2]
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
    return cv2.resize(img, ((w + pw) // k, (h + ph) // k), interpolation=cv2.INTER_AREA)


def reference_maps(od_sum: np.ndarray, he: np.ndarray, mpp: float, cfg: Any) -> dict[str, np.ndarray]:
    """:class:`TissueMaps` for one tile in NumPy / SciPy.

    Parameters
    ----------
    od_sum : (H, W) float32 ndarray
        Summed RGB OD.
    he : (H, W, 2) float32 ndarray
        Haematoxylin and eosin densities.
    mpp : float
        µm per pixel of the inputs.
    cfg : TissueClassesConfig

    Returns
    -------
    dict of str to (ceil(H/k), ceil(W/k)) float32 ndarray
        ``bright``, ``h_ctx``, ``e_ctx`` (and ``clear_od``) as the module.
    """
    k = class_factor(mpp, cfg.class_mpp)
    smooth = gaussian_reference(od_sum, float(cfg.bright_sigma_um) / float(mpp))
    stained = smooth >= np.float32(cfg.bright_max_od)
    bright = ~_block_reduce_edge(stained, k, np.any) if k > 1 else ~stained
    dens = _block_reduce_edge(np.asarray(he, np.float32), k, np.mean) if k > 1 else np.asarray(he, np.float32)
    dens = np.maximum(dens, 0.0)
    ctx_px = float(cfg.context_sigma_um) / (mpp * k)
    out = {
        "bright": bright.astype(np.float32),
        "h_ctx": gaussian_reference(dens[..., 0], ctx_px),
        "e_ctx": gaussian_reference(dens[..., 1], ctx_px),
    }
    if getattr(cfg, "clear_max_od_excess", None) is not None:
        od = np.asarray(od_sum, np.float32)
        out["clear_od"] = _block_reduce_edge(od, k, np.mean).astype(np.float32) if k > 1 else od
    return out


@dataclass
class FatObjects:
    """Adipocyte spaces found by :func:`classify_tissue`, at the class resolution.

    Attributes
    ----------
    row, col : (N,) float64 ndarray
        Centroids in class pixels.
    area_px : (N,) int64 ndarray
        Lumen area in class pixels (the whole region, also beyond the tile core).
    """

    row: np.ndarray
    col: np.ndarray
    area_px: np.ndarray


def _empty_fat() -> FatObjects:
    return FatObjects(np.zeros(0), np.zeros(0), np.zeros(0, np.int64))


def opaque_pixels(rgb: np.ndarray, k: int, cfg: Any) -> np.ndarray | None:
    """Class pixels that are black or neutral grey and dark: no stain, but a scanner's black fill
    or marker ink. Read as stained tissue they would be haematopoietic, and their edges nuclei.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        The tile at the analysis resolution.
    k : int
        Analysis pixels per class pixel (:func:`class_factor`).
    cfg : TissueClassesConfig
        ``opaque_min_od`` (null: returns None) and ``opaque_min_greyness``.

    Returns
    -------
    (ceil(H/k), ceil(W/k)) bool ndarray or None
    """
    if getattr(cfg, "opaque_min_od", None) is None:
        return None
    # to within uint8 rounding of the mean: ~100x faster than a float reduction of the tile
    rgb = block_mean(np.ascontiguousarray(rgb, dtype=np.uint8), k)
    return opaque_colour(rgb, cfg)


def exclude_opaque(rgb: np.ndarray, k: int, cfg: Any, valid: np.ndarray, border: np.ndarray,
                   maps: dict[str, np.ndarray], keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Put a tile's opaque pixels (:func:`opaque_pixels`) outside the section.

    They leave ``valid`` and ``border`` (class resolution), as beyond the slide, and the
    ``maps`` named in ``keys`` (analysis resolution, replaced in the dict) read 0 over them:
    a black mass would otherwise be a nucleus, and merged, a giant "megakaryocyte".

    Returns
    -------
    valid, border : (h, w) bool ndarray
    """
    opaque = opaque_pixels(rgb, k, cfg)
    if opaque is None or not opaque.any():
        return valid, border
    valid = valid & ~opaque
    shape = next(maps[key].shape for key in keys if key in maps)
    ink = upsample_labels(opaque.astype(np.uint8), k, shape).astype(bool)
    for key in keys:
        if key in maps:
            maps[key] = np.where(ink, np.float32(0), maps[key])
    return valid, border & valid


def slide_clear_level(sample_rgb: np.ndarray, cfg: Any, min_pixels: int = 1000) -> float | None:
    """The slide's clear level: median summed RGB OD of the sample's clear pixels (summed OD
    below ``cfg.bright_max_od``: glass and fat lumen, with a few pale-tissue pixels).

    Pure white pixels are left out: they are the padding round a slide smaller than its tile,
    not glass. None when ``cfg.clear_max_od_excess`` is null or fewer than ``min_pixels`` are clear.
    """
    if getattr(cfg, "clear_max_od_excess", None) is None:
        return None
    px = np.asarray(sample_rgb).reshape(-1, 3)
    px = px[(px < 255).any(axis=1)]
    od = stains.od_from_rgb(px).sum(axis=1)
    clear = od[od < float(cfg.bright_max_od)]
    return float(np.median(clear)) if clear.size >= min_pixels else None


def without_opaque(sample_rgb: np.ndarray, cfg: Any) -> np.ndarray:
    """A stain sample's pixels, ``(N, 3)``, less the opaque ones (:func:`opaque_colour`): black
    fill would pass for the darkest stain in the slide's stain estimate."""
    sample_rgb = np.asarray(sample_rgb).reshape(-1, 3)
    opaque = opaque_colour(sample_rgb, cfg)
    return sample_rgb if opaque is None or not opaque.any() else sample_rgb[~opaque]


def opaque_colour(rgb: np.ndarray, cfg: Any) -> np.ndarray | None:
    """Which colours (``(..., 3)``, 0..255) are black or neutral grey and dark (see
    :func:`opaque_pixels`); None when ``cfg.opaque_min_od`` is null. Also used to keep black
    fill out of a slide's stain sample, where it would pass for the darkest stain."""
    min_od = getattr(cfg, "opaque_min_od", None)
    if min_od is None:
        return None
    rgb = np.asarray(rgb)
    g = float(cfg.opaque_min_greyness)
    # the sum reaches min_od only if the darkest channel's OD reaches min_od / 3, and then every
    # channel's reaches g * min_od / 3: brighter colours are not looked at further
    bound = 255.0 * 10.0 ** (-g * float(min_od) / 3.0)
    if rgb.dtype == np.uint8 and rgb.ndim == 3:
        ch = cv2.split(rgb)  # OpenCV's channel max is ~10x NumPy's reduce over a last axis of 3
        brightest = cv2.max(cv2.max(ch[0], ch[1]), ch[2])
    else:
        brightest = rgb.max(axis=-1)
    out = brightest <= bound
    if out.any():
        cand = rgb[out]
        od = stains.od_from_rgb(cand)
        grey = od.min(axis=-1) / np.maximum(od.max(axis=-1), 1e-6)
        out[out] = (od.sum(axis=-1) >= min_od) & (grey >= g)
    return out


def classify_tissue(
    bright: np.ndarray,
    h_ctx: np.ndarray,
    e_ctx: np.ndarray,
    class_mpp: float,
    cfg: Any,
    *,
    valid: np.ndarray | None = None,
    open_border: np.ndarray | None = None,
    clear_od: np.ndarray | None = None,
    clear_level: float | None = None,
) -> tuple[np.ndarray, FatObjects]:
    """Label every pixel haematopoietic, fat, bone or excluded.

    Parameters
    ----------
    bright : (H, W) bool or float ndarray
        Unstained pixels (true where > 0.5).
    h_ctx, e_ctx : (H, W) float32 ndarray
        Local mean haematoxylin and eosin densities, OD.
    class_mpp : float
        Pixel size of these maps, µm per pixel.
    cfg : TissueClassesConfig
    valid : (H, W) bool ndarray, optional
        Pixels inside the slide; the rest is excluded and closes no region.
    open_border : (H, W) bool ndarray, optional
        Pixels on tile borders that lie inside the slide: a bright region touching one
        continues beyond the tile and is background. Default: none (the whole image
        is the slide).
    clear_od : (H, W) float32 ndarray, optional
        Mean summed RGB OD of each class pixel (``TissueMaps``' ``clear_od``).
    clear_level : float, optional
        The slide's clear level, summed OD (glass and fat lumen: :func:`slide_clear_level`). With
        ``clear_od`` and ``cfg.clear_max_od_excess``, pale clear regions join the tissue before
        anything is judged (:func:`_pale_regions_are_tissue`); this level is used where the tile
        holds no large fat space to measure its own.

    Returns
    -------
    labels : (H, W) uint8 ndarray
        :data:`EXCLUDED` 0, :data:`HAEMATOPOIETIC` 1, :data:`FAT` 2, :data:`BONE` 3.
    fat : FatObjects
        One entry per fat space (before membranes are added).
    """
    bright = np.asarray(bright) > 0.5
    if bright.ndim != 2 or bright.shape != np.shape(h_ctx) or bright.shape != np.shape(e_ctx):
        raise ValueError(f"bright {bright.shape}, h_ctx {np.shape(h_ctx)}, e_ctx {np.shape(e_ctx)} must be one (H, W) shape")
    shape = bright.shape
    if valid is None:
        valid = np.ones(shape, bool)
    if open_border is None:
        open_border = np.zeros(shape, bool)
    px_um2 = float(class_mpp) ** 2
    bright = bright & valid
    close_um = getattr(cfg, "stained_closing_um", None)
    if close_um:
        # IHC: the unstained cytoplasm between nuclei is tissue; a fat space is far wider than the disk
        closed = _closing_edt(valid & ~bright, close_um / class_mpp)
        min_h = getattr(cfg, "stained_closing_min_haem_od", None)
        if min_h is not None:
            # the closing fills the corners of fat spaces (where membranes meet, or a membrane meets
            # bone) as it fills the gaps between nuclei; a corner holds no nucleus nearby
            closed &= ~(bright & (h_ctx < np.float32(min_h)))
        bright = bright & ~closed
    excess = getattr(cfg, "clear_max_od_excess", None)
    if excess is not None and clear_od is not None and bright.any():
        bright = _pale_regions_are_tissue(bright, np.asarray(clear_od), clear_level, float(excess), class_mpp, cfg)
    tissue = valid & ~bright
    # Unstained space outside the tissue outline (tissue closed by envelope_um) is glass,
    # whatever its shape: this cuts peripheral fat spaces whose outer membrane is missing
    # off the open glass they would otherwise join.
    if cfg.envelope_um:
        # beyond the slide edge counts as tissue here, so the edge does not erode the outline. Beyond
        # the array nothing erodes either (a fat space the image edge cuts stays closed), except past a
        # clear run along the border longer than any fat space: that is glass going on, and a glass
        # margin along the image edge is not closed in as if tissue walled it (a tissue field with a
        # 50 µm margin of glass read that margin as fat: cellularity 97 -> 79 %)
        outline = tissue | ~valid
        inside = _closing_edt(outline, cfg.envelope_um / class_mpp,
                              open_border=_long_border_gaps(outline, cfg.fat_max_diameter_um / class_mpp))
        glass_cut = bright & ~inside
        if getattr(cfg, "envelope_fat", False) and glass_cut.any():
            # a clear space wider than the closing but walled in by tissue (it reaches
            # neither the tile's nor the slide's edge) is inside the outline, not glass
            frame = _dilate_cross(~valid) | _frame(shape)
            gcomp, ng = ndi.label(glass_cut)
            open_ids = np.zeros(ng + 1, bool)
            open_ids[np.unique(gcomp[frame & glass_cut])] = True
            open_ids[0] = True
            inside = inside | ~open_ids[gcomp]
            glass_cut = bright & ~inside
        bright = bright & inside
    else:
        glass_cut = np.zeros(shape, bool)

    labels = np.zeros(shape, np.uint8)
    comp, n = ndi.label(bright)
    fat = _empty_fat()
    hole = np.zeros(shape, bool)
    if n:
        area = np.bincount(comp.ravel(), minlength=n + 1).astype(np.int64)
        diam_um = np.sqrt(4.0 * area * px_um2 / np.pi)
        touches = np.zeros(n + 1, bool)
        touches[np.unique(comp[open_border & bright])] = True
        is_hole = diam_um < cfg.fat_min_diameter_um
        is_hole[0] = False
        hole = is_hole[comp]
        split_um = getattr(cfg, "fat_split_um", None)
        envelope_fill = bool(getattr(cfg, "envelope_fat", False))
        if split_um or envelope_fill:
            fat = _fat_spaces(comp, diam_um, touches | is_hole, glass_cut, class_mpp, cfg,
                              split_px=(split_um or 0.0) / class_mpp, envelope_fill=envelope_fill, labels=labels)
        else:
            cand = ~is_hole & ~touches & (diam_um <= cfg.fat_max_diameter_um)
            cand[0] = False
            is_fat = np.zeros(n + 1, bool)
            ids = np.flatnonzero(cand)
            if len(ids):
                sub = np.where(np.isin(comp, ids), comp, 0)
                props = regionprops_table(sub, properties=("label", "centroid"))
                objs = ndi.find_objects(sub)
                solidity = np.array([_solidity(sub[objs[i - 1]] == i) for i in props["label"]])
                ok = solidity >= cfg.fat_min_solidity
                is_fat[props["label"][ok]] = True
                fat = FatObjects(
                    props["centroid-0"][ok].astype(np.float64),
                    props["centroid-1"][ok].astype(np.float64),
                    area[props["label"][ok]],
                )
            labels[is_fat[comp]] = FAT

    # tissue: bone where matrix is eosinophilic and acellular over a context window
    if getattr(cfg, "context_over_tissue", False) and tissue.any():
        # the window's mean over its stained pixels: the unstained share would dilute it by the
        # edge (floor: a thin strand between clear spaces is not amplified past 4x)
        share = gaussian_reference(tissue.astype(np.float32), float(cfg.context_sigma_um) / float(class_mpp))
        share = np.maximum(share, np.float32(0.25))
        h_ctx, e_ctx = h_ctx / share, e_ctx / share
    bone = tissue & (e_ctx >= cfg.bone_min_eosin_od) & (h_ctx <= cfg.bone_max_haem_od)
    r_open = int(round(cfg.bone_open_um / class_mpp))
    if r_open > 0 and bone.any():
        bone = binary_opening(bone, disk(r_open))
    if bone.any():
        comp_b, nb = ndi.label(bone)
        area_b = np.bincount(comp_b.ravel(), minlength=nb + 1) * px_um2
        keep = area_b >= cfg.bone_min_area_um2
        keep[0] = False
        bone = keep[comp_b]
    labels[tissue] = HAEMATOPOIETIC
    labels[bone] = BONE

    # small unstained holes take the class of the nearest tissue pixel around them
    if hole.any() and tissue.any():
        _, ir, ic = nearest_feature(tissue, hole)
        labels[hole] = labels[ir, ic]

    # thin membranes between fat spaces are part of the fat
    r_mem = int(round(cfg.membrane_um / class_mpp))
    if r_mem > 0 and fat.row.size:
        is_fat = labels == FAT
        closed = binary_closing(is_fat, disk(r_mem))
        labels[closed & ~is_fat & (labels == HAEMATOPOIETIC)] = FAT
    # the membrane around each space (its own rim, drawn by stained pixels) is the adipocyte's
    rim_um = getattr(cfg, "fat_rim_um", None)
    if rim_um and fat.row.size:
        near = _within(labels == FAT, rim_um / class_mpp)
        labels[near & (labels == HAEMATOPOIETIC)] = FAT
    labels[~valid] = EXCLUDED
    return labels, fat


def _pale_regions_are_tissue(bright: np.ndarray, clear_od: np.ndarray, slide_level: float | None, excess: float,
                             class_mpp: float, cfg: Any) -> np.ndarray:
    """``bright`` less the clear regions of a fat space's size or smaller that still absorb light.

    An IHC counterstain leaves pale cytoplasm below ``bright_max_od``; a patch of it holds some
    light absorption, where a fat space holds none. Each region is judged by its mean summed OD 2 µm
    in from its edge (the edge takes up the blur of the stain round it) against the level of the
    tile's large fat-sized clear regions (half the widest fat space across to the widest: fat
    lumen), or ``slide_level`` where the tile has none; the phantoms' fat lumen reads 0.02-0.05
    above their glass, so the glass is no measure of it. Regions larger than a fat space are
    never changed: the glass round a pale section is one region with the pale tissue it reaches.
    """
    comp, n = ndi.label(bright)
    inner = np.where(distance_to_background(bright) * float(class_mpp) >= 2.0, comp, 0)
    od = np.asarray(clear_od, np.float64).ravel()
    cnt = np.bincount(inner.ravel(), minlength=n + 1)
    mean = np.bincount(inner.ravel(), weights=od, minlength=n + 1) / np.maximum(cnt, 1)
    all_cnt = np.bincount(comp.ravel(), minlength=n + 1)
    edge_only = cnt == 0
    if edge_only.any():
        all_mean = np.bincount(comp.ravel(), weights=od, minlength=n + 1) / np.maximum(all_cnt, 1)
        mean[edge_only] = all_mean[edge_only]
    area_um2 = all_cnt * float(class_mpp) ** 2
    fat_max_um2 = math.pi / 4.0 * float(cfg.fat_max_diameter_um) ** 2
    ref = (area_um2 >= fat_max_um2 / 4.0) & (area_um2 <= fat_max_um2) & (cnt > 0)
    ref[0] = False
    if ref.any():
        level = float(np.median(od[ref[inner.ravel()]]))
    elif slide_level is not None:
        level = float(slide_level)
    else:
        return bright
    pale = (mean > level + excess) & (area_um2 <= fat_max_um2)
    pale[0] = False
    return bright & ~pale[comp]


def _fat_spaces(
    comp: np.ndarray,
    diam_um: np.ndarray,
    skip: np.ndarray,
    glass_cut: np.ndarray,
    class_mpp: float,
    cfg: Any,
    *,
    split_px: float,
    envelope_fill: bool,
    labels: np.ndarray,
) -> FatObjects:
    """Judge each closed unstained region as fat, one adipocyte per accepted space.

    A region that fails the size / solidity tests is split at its necks (watershed of the
    distance transform, markers the maxima deeper than ``split_px``): adjacent spaces whose
    shared membrane is too pale to see. A space (or piece) that borders the glass cut off by
    the envelope gets back the glass inside its own convex hull: the part of a peripheral
    adipocyte the envelope's disk bit off. Accepted spaces are written into ``labels`` as FAT.
    """
    px_um2 = float(class_mpp) ** 2
    rows, cols, areas = [], [], []
    shape = comp.shape

    def ok(mask: np.ndarray) -> bool:
        d = np.sqrt(4.0 * mask.sum() * px_um2 / np.pi)
        if not cfg.fat_min_diameter_um <= d <= cfg.fat_max_diameter_um:
            return False
        return _solidity(mask) >= cfg.fat_min_solidity

    for i, sl in enumerate(ndi.find_objects(comp), start=1):
        if sl is None or skip[i]:
            continue
        # an unsplittable region several times the largest adipocyte is open space
        if diam_um[i] > 4 * cfg.fat_max_diameter_um:
            continue
        sl = tuple(slice(max(0, s.start - 1), min(m, s.stop + 1)) for s, m in zip(sl, shape, strict=True))
        m = comp[sl] == i
        gc = glass_cut[sl]
        pieces = [m]
        if split_px > 0 and not ok(m):
            pieces = _split_necks(m, split_px)
        for piece in pieces:
            f = piece
            if envelope_fill and _touches(piece, gc):
                f = piece | (convex_hull_image(piece) & gc)
            if not ok(f):
                continue
            labels[sl][f] = FAT
            r, c = np.nonzero(f)
            rows.append(r.mean() + sl[0].start)
            cols.append(c.mean() + sl[1].start)
            areas.append(int(f.sum()))
    if not rows:
        return _empty_fat()
    return FatObjects(np.asarray(rows, np.float64), np.asarray(cols, np.float64), np.asarray(areas, np.int64))


def _dilate_cross(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_dilation(mask)``: one step of the 4-neighbour cross, nothing beyond the edge."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _touches(piece: np.ndarray, other: np.ndarray) -> bool:
    """``(ndi.binary_dilation(piece) & other).any()``, without SciPy's per-call cost."""
    return bool((_dilate_cross(piece) & other).any())


def _split_necks(mask: np.ndarray, h_px: float) -> list[np.ndarray]:
    """Pieces of ``mask`` cut at necks: watershed of its distance transform from h-maxima."""
    edt = ndi.distance_transform_edt(mask)
    markers, nm = ndi.label(h_maxima(edt, h_px))
    if nm <= 1:
        return [mask]
    ws = watershed(-edt, markers, mask=mask)
    return [ws == j for j in range(1, nm + 1)]


def _frame(shape: tuple[int, int]) -> np.ndarray:
    """True on the outermost rows and columns of an image of ``shape``."""
    f = np.zeros(shape, bool)
    f[0, :] = f[-1, :] = f[:, 0] = f[:, -1] = True
    return f


def _long_border_gaps(mask: np.ndarray, min_run_px: float) -> np.ndarray:
    """The pixels of ``mask``'s four outermost rows / columns in runs of False longer than ``min_run_px``."""
    out = np.zeros(mask.shape, bool)
    for line, hit in ((mask[0, :], out[0, :]), (mask[-1, :], out[-1, :]), (mask[:, 0], out[:, 0]), (mask[:, -1], out[:, -1])):
        gap = np.concatenate([[False], ~line, [False]])
        edges = np.flatnonzero(np.diff(gap.astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            if stop - start > min_run_px:
                hit[start:stop] = True  # a view into out
    return out


def _closing_edt(mask: np.ndarray, radius_px: float, *, open_border: np.ndarray | None = None) -> np.ndarray:
    """Binary closing by a disk of ``radius_px`` through two Euclidean distance transforms.

    Beyond the array nothing erodes: a region the dilation carries to the border stays closed.
    ``open_border`` (border pixels) continues past the border as open space that does erode:
    what is open there stays open.
    """
    if radius_px <= 0 or not mask.any():
        return mask.copy()
    if open_border is not None and open_border.any():
        pad = int(math.ceil(radius_px)) + 1
        beyond = np.pad(np.zeros(mask.shape, bool), pad, constant_values=True)
        opened = np.pad(open_border, pad, mode="edge") & beyond
        dilated = _within(np.pad(mask, pad), radius_px) | (beyond & ~opened)
        return ~_within(~dilated, radius_px)[pad:-pad, pad:-pad]
    dilated = _within(mask, radius_px)
    if dilated.all():
        return dilated
    return ~_within(~dilated, radius_px)


def _within(sites: np.ndarray, radius_px: float) -> np.ndarray:
    """``ndi.distance_transform_edt(~sites) <= radius_px``: pixels within ``radius_px`` of a site.

    Through OpenCV's exact transform (:func:`~marrowseg.analyzers.distance.distance_to_background`):
    its float32 distances are square roots of integers, so they fall on the same side of the
    radius as SciPy's float64 ones unless the radius is within float32 rounding of such a root
    (tests/test_tissue.py checks equality). Without any site nothing is within reach (SciPy
    would measure from a site of its own outside the image).
    """
    if not sites.any():
        return np.zeros(sites.shape, bool)
    # distances past the radius only need to be known as such
    reach = int(math.floor(float(radius_px)))
    return distance_to_background(~sites, reach=reach).astype(np.float64) <= float(radius_px)


def convex_area_px(mask: np.ndarray) -> int:
    """Pixels of ``skimage.morphology.convex_hull_image(mask)``, counted exactly.

    The hull is that of the pixels' edge midpoints (``offset_coordinates=True``), pixels on
    its border included; the count is per row, with the hull's chord at each row in exact
    integer arithmetic (coordinates doubled, so every vertex is an integer point).

    Parameters
    ----------
    mask : (H, W) bool ndarray
        One object (need not be connected); at least one pixel.

    Returns
    -------
    int
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise ValueError("convex_area_px: empty mask")
    sub = mask[rows]
    w = mask.shape[1]
    left = sub.argmax(axis=1)
    right = w - 1 - sub[:, ::-1].argmax(axis=1)
    r = np.concatenate([rows, rows]).astype(np.int64)
    c = np.concatenate([left, right]).astype(np.int64)
    # edge midpoints of the extreme pixels of each row, doubled: (2r +- 1, 2c), (2r, 2c +- 1)
    pr = np.concatenate([2 * r - 1, 2 * r + 1, 2 * r, 2 * r])
    pc = np.concatenate([2 * c, 2 * c, 2 * c - 1, 2 * c + 1])
    hull = cv2.convexHull(np.column_stack([pc, pr]).astype(np.int32)).reshape(-1, 2).astype(np.int64)
    x1, y1 = hull[:, 0], hull[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    keep = y1 != y2
    x1, y1, x2, y2 = x1[keep], y1[keep], x2[keep], y2[keep]
    ys = 2 * np.arange(rows[0], rows[-1] + 1, dtype=np.int64)  # doubled image rows
    dy = (y2 - y1)[:, None]
    on = (ys[None, :] >= np.minimum(y1, y2)[:, None]) & (ys[None, :] <= np.maximum(y1, y2)[:, None])
    # x = x1 + (x2 - x1) (y - y1) / (y2 - y1) = num / den, den > 0; image column j at 2j
    num = x1[:, None] * dy + (x2 - x1)[:, None] * (ys[None, :] - y1[:, None])
    sign = np.sign(dy)
    num, den = num * sign, dy * sign
    lo = np.where(on, -((-num) // (2 * den)), np.iinfo(np.int64).max).min(axis=0)  # ceil(x / 2)
    hi = np.where(on, num // (2 * den), np.iinfo(np.int64).min).max(axis=0)  # floor(x / 2)
    return int(np.maximum(hi - lo + 1, 0).sum())


def _solidity(mask: np.ndarray) -> float:
    """``regionprops(mask)[0].solidity``: pixels over pixels of the convex hull image."""
    return float(np.count_nonzero(mask)) / convex_area_px(mask)


def upsample_labels(labels: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a class map by ``k``, cropped to ``shape`` (rows, cols)."""
    if k == 1:
        return labels[: shape[0], : shape[1]]
    return np.repeat(np.repeat(labels, k, axis=0), k, axis=1)[: shape[0], : shape[1]]
