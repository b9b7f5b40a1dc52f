"""Which stain is this slide? H&E, DAB immunohistochemistry or silver (reticulin), from colour.

Every tissue pixel's optical density (OD) is split into its grey part (along the neutral
axis (1, 1, 1)) and its chroma: the OD component orthogonal to that axis, drawn in a plane
with the basis ``u1 = (1, -1, 0) / sqrt 2``, ``u2 = (1, 1, -2) / sqrt 6``. The angle of the
chroma in that plane names the dye, whatever its amount (Ruifrok & Johnston 2001, Table 1
vectors; angles computed from them):

=============================  ==========  ==========================================
dye                            angle, deg  colour
=============================  ==========  ==========================================
haematoxylin (0.65, 0.70, 0.29)    97      blue-purple nuclei
eosin (0.07, 0.99, 0.11)          152      pink cytoplasm, stroma, erythrocytes
fast red / Kernechtrot            174      red counterstain of reticulin stains
DAB (0.27, 0.57, 0.78)            234      brown IHC chromogen
gold toning of silver stains      233      golden-brown bone matrix
metallic silver                  ~neutral  grey-black fibres
=============================  ==========  ==========================================

So H&E puts its chroma at eosin and haematoxylin and almost none at DAB; DAB IHC puts it at
DAB and haematoxylin and little at eosin; a silver stain has many dark pixels with almost no
chroma at all (fibres), plus red counterstain and golden tones. The scores below are built
from those three observations; the confidence is the margin between the best and the second.

References
----------
Ruifrok AC, Johnston DA. Quantification of histochemical staining by color deconvolution.
Anal Quant Cytol Histol 2001;23:291-299.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from marrowseg.errors import NoTissueError
from marrowseg.stains import OD_OF_UINT8, od_from_rgb

__all__ = ["StainGuess", "stain_features", "tissue_pixels", "identify_stain", "identify_slide", "STAIN_OF_CLASS"]

#: colour class -> marrowseg stain key (E-cadherin is our only DAB IHC)
STAIN_OF_CLASS = {"he": "he", "dab": "ecad", "silver": "reticulin"}

_U1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
_U2 = np.array([1.0, 1.0, -2.0]) / np.sqrt(6.0)
_NEUTRAL = np.ones(3) / np.sqrt(3.0)

#: sectors of the chroma angle, degrees [start, stop)
_SECTORS = {
    "blue": (40.0, 125.0),      # haematoxylin and other blue-purples
    "pink": (125.0, 200.0),     # eosin, fast red
    "brown": (200.0, 275.0),    # DAB, gold, iron
}
#: a pixel is tissue when its mean OD exceeds this (glass ~0.01-0.05)
_TISSUE_OD = 0.12
#: brightest channel at or below this (0..255): black fill, not a stain; silver fibres keep some light
_NO_SIGNAL = 8
#: and it is "dark" when its mean OD exceeds this (nuclei, fibres, strong chromogen)
_DARK_OD = 0.55
#: chroma / grey of a "neutral" pixel (metallic silver, black ink)
_NEUTRAL_RATIO = 0.18


@dataclass(frozen=True)
class StainGuess:
    """Result of :func:`identify_stain`.

    Attributes
    ----------
    stain : str or None
        ``'he'``, ``'ecad'`` or ``'reticulin'``; None when the confidence is below the threshold.
    colour_class : str
        ``'he'``, ``'dab'`` or ``'silver'``: the best-scoring class, even when not confident.
    confidence : float
        Best score minus the second best, in [0, 1].
    scores : dict
        Score of each colour class, in [0, 1].
    features : dict
        The colour statistics the scores came from.
    """

    stain: str | None
    colour_class: str
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)


def tissue_pixels(rgb: np.ndarray, tissue_od: float = _TISSUE_OD) -> np.ndarray:
    """Which pixels of an RGB image are stained tissue: mean optical density above
    ``tissue_od`` (glass is ~0.01-0.05), and some light in at least one channel (black fill,
    an unscanned area or an opaque label, is no stain, and as neutral and dark it would pass
    for silver).

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
    tissue_od : float
        Mean OD above which a pixel counts as tissue.

    Returns
    -------
    (H, W) bool ndarray
    """
    arr = np.asarray(rgb)[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    # OpenCV's per-channel look-up, adds and channel max: ~10x NumPy's gathers and reduce over a
    # last axis of 3 on a tile (the engine scores windows of eight sample tiles with this), and
    # the same float32 sums in the same order, so the same pixels pass
    if arr.size == 0:
        return np.zeros(arr.shape[:-1], bool)
    img = np.ascontiguousarray(arr if arr.ndim == 3 else arr.reshape(-1, 1, 3))
    r, g, b = cv2.split(cv2.LUT(img, OD_OF_UINT8))
    mean_od = cv2.add(cv2.add(r, g), b)
    np.divide(mean_od, 3.0, out=mean_od)
    ch = cv2.split(img)
    brightest = cv2.max(cv2.max(ch[0], ch[1]), ch[2])
    return ((mean_od > tissue_od) & (brightest > _NO_SIGNAL)).reshape(arr.shape[:-1])


def stain_features(rgb: np.ndarray, *, tissue_od: float = _TISSUE_OD) -> dict[str, float]:
    """Colour statistics of the tissue pixels of an RGB image.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        Slide thumbnail or field, bright background.
    tissue_od : float
        Mean OD above which a pixel counts as tissue.

    Returns
    -------
    features : dict
        ``tissue_frac`` (fraction of pixels that are tissue), ``n_tissue``, ``blue_frac``,
        ``pink_frac``, ``brown_frac`` (chroma-weighted share of each sector, sums to <= 1),
        ``chroma_ratio`` (median chroma / grey of tissue pixels), ``pink_saturation`` (the same
        median over the pink sector's pixels only), ``neutral_dark_frac``
        (fraction of dark tissue pixels that are neutral), ``dark_frac`` (fraction of tissue
        pixels that are dark).

    Raises
    ------
    ValueError
        ``rgb`` is not (H, W, 3).
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    tissue = tissue_pixels(arr, tissue_od).reshape(-1)
    n = int(tissue.sum())
    feats: dict[str, float] = {"tissue_frac": float(tissue.mean()) if tissue.size else 0.0, "n_tissue": float(n)}
    if n == 0:
        return feats | {"blue_frac": 0.0, "pink_frac": 0.0, "brown_frac": 0.0, "chroma_ratio": 0.0,
                        "pink_saturation": 0.0, "neutral_dark_frac": 0.0, "dark_frac": 0.0}
    # the optical density of the tissue pixels only (float32, the same values as the table's)
    px = arr[..., :3].reshape(-1, 3)[tissue]
    od = od_from_rgb(px)
    t = od.astype(np.float64)
    grey = t @ _NEUTRAL
    c1, c2 = t @ _U1, t @ _U2
    chroma = np.hypot(c1, c2)
    angle = np.degrees(np.arctan2(c2, c1)) % 360.0
    total = chroma.sum() + 1e-12
    for name, (a0, a1) in _SECTORS.items():
        feats[f"{name}_frac"] = float(chroma[(angle >= a0) & (angle < a1)].sum() / total)
    ratio = chroma / np.maximum(grey, 1e-6)
    feats["chroma_ratio"] = float(np.median(ratio))
    pink = (angle >= _SECTORS["pink"][0]) & (angle < _SECTORS["pink"][1])
    feats["pink_saturation"] = float(np.median(ratio[pink])) if pink.any() else 0.0
    dark = od.mean(axis=1) > _DARK_OD
    feats["dark_frac"] = float(dark.mean())
    feats["neutral_dark_frac"] = float((ratio[dark] < _NEUTRAL_RATIO).mean()) if dark.any() else 0.0
    return feats


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def _scores(f: dict[str, float]) -> dict[str, float]:
    """Fuzzy scores of the three colour classes from :func:`stain_features`.

    * silver: brown-gold and red chroma but no haematoxylin blue (Gomori counterstains are
      red or none), or dark pixels that are mostly neutral (grey-black fibres);
    * H&E: pink is a real share next to blue (eosin) and brown is small next to pink;
    * DAB IHC: a haematoxylin counterstain with hardly any pink, or brown that outweighs pink.

    Thresholds were set on the stain vectors' angles and checked on phantoms and public
    images (``scripts/eval_stain_id.py``).
    """
    blue, pink, brown = f["blue_frac"], f["pink_frac"], f["brown_frac"]
    coloured = _ramp(f["chroma_ratio"], 0.04, 0.08)
    no_blue = 1.0 - _ramp(blue, 0.02, 0.06)
    pink_vs_blue = pink / (pink + blue) if pink + blue > 0 else 0.0
    brown_vs_pink = brown / (brown + pink) if brown + pink > 0 else 0.0
    neutral_fibres = _ramp(f["neutral_dark_frac"], 0.5, 0.8) * _ramp(f["dark_frac"], 0.005, 0.02)
    silver = no_blue * max(coloured * _ramp(brown, 0.05, 0.15), neutral_fibres)
    pinky = _ramp(pink_vs_blue, 0.10, 0.20)
    # Haematoxylin mixed with DAB (a lightly counterstained IHC's bone and stroma) falls in the
    # pink sector, so an IHC field with few positive cells can look as pink as a heavily
    # haematoxylin-stained H&E (OS-1: pink 0.24 of the chroma). The DAB background tells them
    # apart: brown is 0.03-0.05 of the chroma on every E-cadherin phantom and 0.00 on every real
    # H&E here. A ramp of 0.10-0.30 called two of ten E-cadherin phantoms H&E (sixth session).
    browny = _ramp(brown_vs_pink, 0.05, 0.12)
    # And the pink itself: eosin is a saturated dye (chroma / grey 1.09 for its Ruifrok vector)
    # and keeps a haematoxylin mixture above that of haematoxylin alone (0.33), while haematoxylin
    # and DAB, 137 degrees apart, cancel each other's chroma (an even mix: 0.13). Pink pixels read
    # 0.30-0.45 on the real H&E here and 0.15-0.18 on E-cadherin phantoms, of which 3 of 8 at
    # 1,536 px were called H&E on pink share alone (seventeenth session).
    eosin = _ramp(f["pink_saturation"], 0.20, 0.26)
    pinky *= eosin
    he = coloured * (1.0 - silver) * pinky * (1.0 - browny)
    dab = coloured * (1.0 - silver) * max(1.0 - pinky, browny)
    return {"he": float(he), "dab": float(dab), "silver": float(silver)}


def identify_stain(rgb: np.ndarray, *, min_confidence: float = 0.25,
                   min_tissue_px: int = 500) -> StainGuess:
    """Guess the stain of an RGB image from the colour of its tissue.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        A thumbnail (about 1 to 4 µm/px) or a field at full resolution.
    min_confidence : float
        Below this margin between the best and second-best score, ``stain`` is None.
    min_tissue_px : int
        Fewer tissue pixels than this raise :class:`NoTissueError`.

    Returns
    -------
    StainGuess

    Raises
    ------
    NoTissueError
        Not enough tissue pixels to judge.
    """
    f = stain_features(rgb)
    if f["n_tissue"] < min_tissue_px:
        raise NoTissueError(f"no tissue to recognise the stain from ({int(f['n_tissue'])} tissue pixels)")
    scores = _scores(f)
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    best, second = ranked[0], ranked[1]
    conf = float(np.clip(best[1] - second[1], 0.0, 1.0))
    stain = STAIN_OF_CLASS[best[0]] if conf >= min_confidence else None
    return StainGuess(stain=stain, colour_class=best[0], confidence=conf, scores=scores, features=f)


def identify_slide(reader: Any, *, thumbnail_px: int = 1024, min_confidence: float = 0.25) -> StainGuess:
    """:func:`identify_stain` on a slide's thumbnail (longest side ``thumbnail_px``).

    Parameters
    ----------
    reader : SlideReader
        Open slide (see :func:`marrowseg.io.open_slide`).
    """
    return identify_stain(reader.thumbnail(thumbnail_px), min_confidence=min_confidence)
