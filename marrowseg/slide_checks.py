"""What a slide must be before it is analysed: a brightfield colour scan, fine enough, of the stain asked for.

:func:`marrowseg.engine.plan_slide` runs these on the tissue overview. A file that would otherwise
be measured as if it were a slide is refused with a one-line :class:`~marrowseg.errors.SlideError`:
not a brightfield scan (:func:`brightfield_check`), greyscale for a stain told apart by colour
(:func:`colour_check`), far coarser than validated (:func:`resolution_check`). A scan somewhat
too coarse, and colours that look like another stain (:func:`stain_check`), are flagged and warned of.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from marrowseg.analyzers.base import Analyzer
from marrowseg.errors import NoTissueError, SlideError
from marrowseg.stain_id import STAIN_OF_CLASS, identify_stain, tissue_pixels

__all__ = ["brightfield_check", "colour_check", "stain_check", "resolution_check",
           "STAIN_MISMATCH_CONFIDENCE", "COARSE_SCAN_REFUSED"]

log = logging.getLogger(__name__)

#: A slide whose colours name another stain with at least this confidence (margin between the
#: best and second colour-class score, :func:`marrowseg.stain_id.identify_stain`) is flagged.
#: Twice the recognition's own minimum: on the 71 images of its evaluation no stain was wrong.
STAIN_MISMATCH_CONFIDENCE = 0.5
# Greyscale: 99 % of tissue pixels within this many levels between their brightest and darkest
# channel. Stained tissue reads 76-130 (mbm-dev H&E, Ki67 DAB, BoMBR silver, MoNuSeg); a grey
# image stored as RGB reads 0, a few levels after JPEG.
_GREY_MAX_CHROMA = 8
# A label mask or a painted drawing, not a scan: among the stained tissue pixels (neither glass nor
# black fill: stain_id.tissue_pixels), this share or more takes one of _FLAT_COLOURS exact RGB values
# that leave a channel at 0. No stain absorbs a colour channel completely over a flat area, and a
# scan's sensor noise and stain spread keep any exact value rare (mbm-dev, MoNuSeg, Ki67, BoMBR,
# CMU-1, OS-1, OS-2: the 8 commonest values 0.1-0.5 % of such pixels, none with a zero channel; the
# phantoms, which draw no sensor noise, 2-27 %, none with a zero channel); the DeepLIIF label masks 95-96 %.
_FLAT_COLOURS = 8
_FLAT_MIN_SHARE = 0.8
_FLAT_MIN_PIXELS = 500
# A fluorescence or dark-field image, not a brightfield scan: this share or more of the overview is
# near black (no channel above 40) and under 1 % is bright like glass (every channel >= 180). Brightfield
# slides here: near black 0-1.3 %, bright 11-91 % (an all-tissue crop has its lumens and fat); a
# fluorescence-like field: 85 % and 0 %.
_DARK_MIN_SHARE = 0.5
_DARK_MAX_BRIGHT = 0.01
#: a scan more than this many times coarser than an analyzer's ``max_scan_mpp`` is refused, not flagged
COARSE_SCAN_REFUSED = 2.0


def brightfield_check(name: str, view: np.ndarray, tissue: np.ndarray) -> None:
    """Refuse a file that is not a brightfield scan: a label mask, a painted drawing, a fluorescence image.

    Such files pass every other check: a black background is taken for scanner fill and
    saturated colours for stain. The Ki67 truth masks of the shared data were measured as
    E-cadherin slides (23 E-cad+ per 100 nucleated cells, stain confidence 1.00), and a
    fluorescence-like field was graded as a left-shifted E-cadherin slide.

    Parameters
    ----------
    name : str
        The slide's name, for the message.
    view : (H, W, 3) uint8 ndarray
        The tissue overview.
    tissue : (H, W) bool ndarray
        Its readable tissue pixels.

    Raises
    ------
    SlideError
        ``_FLAT_MIN_SHARE`` or more of the coloured tissue pixels take one of the
        ``_FLAT_COLOURS`` commonest exact values with a channel at 0; or ``_DARK_MIN_SHARE``
        of the overview is near black with next to no bright glass.
    """
    px = view[tissue]
    px = px[tissue_pixels(px)]  # glass, white padding and black fill aside
    if len(px) >= _FLAT_MIN_PIXELS:  # the more specific reason first: a mask's background is black too
        values, counts = np.unique(px.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32), return_counts=True)
        top = np.argsort(counts)[::-1][:_FLAT_COLOURS]
        top_rgb = (values[top, None] >> np.array([16, 8, 0], np.uint32)) & 255
        painted = counts[top][top_rgb.min(axis=1) == 0].sum() / len(px)
        if painted >= _FLAT_MIN_SHARE:
            raise SlideError(f"{name}: {painted:.0%} of its coloured pixels are a few flat colours with a channel at 0: "
                             "a label mask or drawing, not a scan of a stained slide")
    rgb = view.reshape(-1, 3)
    dark = float((rgb.max(axis=1) <= 40).mean())
    if dark >= _DARK_MIN_SHARE and float((rgb.min(axis=1) >= 180).mean()) < _DARK_MAX_BRIGHT:
        raise SlideError(f"{name}: {dark:.0%} of it is near black and under {_DARK_MAX_BRIGHT:.0%} is bright glass: a fluorescence or "
                         "dark-field image, not a brightfield scan of a stained slide")


def stain_check(name: str, view: np.ndarray, stain: str) -> dict[str, Any] | None:
    """What the slide's colours look like (:mod:`marrowseg.stain_id`), and a warning when that is
    confidently another stain than the one it is analysed as: a mislabelled slide or folder would
    otherwise be measured with the wrong analyzer without a word."""
    try:
        guess = identify_stain(view)
    except NoTissueError:
        return None
    looks_like = STAIN_OF_CLASS[guess.colour_class]
    check = {"looks_like": looks_like, "confidence": round(guess.confidence, 3),
             "mismatch": looks_like != stain and guess.confidence >= STAIN_MISMATCH_CONFIDENCE}
    if check["mismatch"]:
        log.warning("%s: analysed as --stain %s, but its colours look like %s (confidence %.2f); is the "
                    "stain right?", name, stain, looks_like, guess.confidence)
    return check


def resolution_check(name: str, scan_mpp: float, analyzer: Analyzer, mpp_source: str = "") -> dict[str, Any] | None:
    """Whether the slide was scanned more coarsely than the analyzer was validated at: it is then
    upsampled to the analysis resolution, and small structures (nuclei, membranes, fibres) blur.

    Raises
    ------
    SlideError
        More than ``COARSE_SCAN_REFUSED`` times coarser: nothing the analyzer measures is resolved
        there (H&E detection F1 0.38 at 4 µm/px), and the upsampled slide costs minutes to analyse
        for nothing (a 512-px Ki67 tile given ``--mpp 50``: 1,156 tiles, 6 minutes, 568 "cells").
    """
    limit = analyzer.max_scan_mpp
    if limit is None:
        return None
    if scan_mpp > COARSE_SCAN_REFUSED * limit:
        hint = (f" (is --mpp {scan_mpp:g} a magnification? a 40x scan is about 0.25 µm/px, a 20x scan 0.5)"
                if mpp_source == "flag" else "")
        raise SlideError(f"{name}: {scan_mpp:g} µm/px is more than {COARSE_SCAN_REFUSED:g}x coarser than the "
                         f"{limit:.2f} µm/px --stain {analyzer.stain} was validated at; its nuclei, membranes "
                         f"and fibres are not resolved{hint}")
    check = {"scan_mpp": round(float(scan_mpp), 4), "max_scan_mpp": float(limit),
             "too_coarse": bool(scan_mpp > limit)}
    if check["too_coarse"]:
        log.warning("%s: scanned at %.2f µm/px, coarser than the %.2f µm/px --stain %s was validated at; "
                    "nuclei, membranes and fibres blur, so its figures may read low", name, scan_mpp, limit, analyzer.stain)
    return check


def colour_check(name: str, tissue_px: np.ndarray, stain: str) -> None:
    """Refuse a greyscale image for a stain whose dyes are told apart by colour.

    Raises
    ------
    SlideError
        99 % of the tissue pixels lie within ``_GREY_MAX_CHROMA`` levels between their brightest
        and darkest channel.
    """
    px = tissue_px.reshape(-1, 3).astype(np.int16)
    chroma = px.max(axis=1) - px.min(axis=1)
    if np.percentile(chroma, 99) < _GREY_MAX_CHROMA:
        raise SlideError(f"{name}: greyscale image: --stain {stain} tells the stains apart "
                         "by colour and needs a colour scan")
