"""Pixel size (µm per pixel) from slide metadata: parsing and validation.

Pure functions; each backend collects candidates in priority order and
:func:`resolve_mpp` picks the first one present.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from marrowseg.errors import MissingMppError, SlideError

__all__ = [
    "MPP_MIN_UM",
    "MPP_MAX_UM",
    "ANISOTROPY_MAX_FRAC",
    "resolve_mpp",
    "mpp_from_aperio",
    "mpp_from_ome",
    "mpp_from_philips",
    "mpp_from_resolution",
]

MPP_MIN_UM = 0.05
MPP_MAX_UM = 100.0
ANISOTROPY_MAX_FRAC = 0.02

# Candidate: (source, mpp_x_um, mpp_y_um) or None when the source is absent.
Candidate = tuple[str, float, float] | None

_UM_PER_UNIT = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,  # micro sign U+00B5
    "μm": 1.0,  # greek mu U+03BC
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}

_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([-+0-9.eE]+)")


def mpp_from_aperio(description: str | None) -> Candidate:
    """Read ``MPP = x`` from an Aperio ImageDescription.

    Parameters
    ----------
    description : str or None
        The first page's ImageDescription.

    Returns
    -------
    candidate : ('aperio', mpp_x_um, mpp_y_um) or None
        None when the description is not Aperio's or has no MPP field.
    """
    if not description or not description.startswith("Aperio"):
        return None
    match = _APERIO_MPP.search(description)
    if match is None:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return ("aperio", value, value)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def mpp_from_ome(ome_xml: str | None) -> Candidate:
    """Read PhysicalSizeX/Y of the first image from OME-XML, converted to µm.

    Parameters
    ----------
    ome_xml : str or None
        The OME-XML document.

    Returns
    -------
    candidate : ('ome', mpp_x_um, mpp_y_um) or None
        None when the XML is absent, unparsable or has no physical size.
        A unit we cannot convert (e.g. a reference frame) also gives None.
    """
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if _local(el.tag) == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        raw = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if raw is None or unit not in _UM_PER_UNIT:
            return None
        try:
            sizes.append(float(raw) * _UM_PER_UNIT[unit])
        except ValueError:
            return None
    return ("ome", sizes[0], sizes[1])


def mpp_from_philips(description: str | None) -> Candidate:
    """Read level 0's DICOM_PIXEL_SPACING from a Philips TIFF's XML ImageDescription.

    Philips IntelliSite TIFFs carry no resolution tags; the pixel size is in the XML, in mm,
    row spacing first (DICOM 0028,0030), once per pyramid level of the WSI image (level 0 first)
    and once for the macro image.

    Parameters
    ----------
    description : str or None
        The first page's ImageDescription.

    Returns
    -------
    candidate : ('philips', mpp_x_um, mpp_y_um) or None
        None when the description is not Philips XML or holds no pixel spacing.
    """
    if not description or "DPUfsImport" not in description[:400]:
        return None
    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return None
    spacings = []

    def add(attrs) -> None:
        for attr in attrs:
            if attr.get("Name") == "DICOM_PIXEL_SPACING" and attr.text:
                try:
                    values = [float(v) for v in attr.text.replace('"', " ").split()]
                except ValueError:
                    continue
                if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
                    spacings.append(values)

    for image in root.iter("DataObject"):
        if image.get("ObjectType") != "DPScannedImage":
            continue
        kind = next((a.text for a in image.findall("Attribute") if a.get("Name") == "PIM_DP_IMAGE_TYPE"), None)
        if (kind or "").strip().upper() != "WSI":
            continue
        add(image.findall("Attribute"))  # the image's own spacing, where the scanner writes one
        for rep in image.iter("DataObject"):
            if rep.get("ObjectType") == "PixelDataRepresentation":
                add(rep.findall("Attribute"))
    if not spacings:
        return None
    row_mm, col_mm = min(spacings, key=lambda v: v[0] * v[1])  # level 0 is the finest
    return ("philips", col_mm * 1e3, row_mm * 1e3)


def _is_default_density(value: float, unit_um: float) -> bool:
    """True for the 1 px/unit, 72 dpi and 96 dpi placeholders written by most software."""
    if math.isclose(value, 1.0, rel_tol=1e-6):
        return True
    dpi = value * 25400.0 / unit_um
    return any(math.isclose(dpi, d, rel_tol=1e-3) for d in (72.0, 96.0))


def mpp_from_resolution(
    x_density: float | None, y_density: float | None, unit_um: float | None, *, source: str
) -> Candidate:
    """Pixel size from a pixel density (TIFF XResolution, PNG pHYs, JFIF density).

    Parameters
    ----------
    x_density, y_density : float or None
        Pixels per unit along x and y.
    unit_um : float or None
        Length of the unit in µm (10 000 for cm, 25 400 for inch); None for
        "no absolute unit", which gives no candidate.
    source : str
        Name recorded as ``mpp_source``.

    Returns
    -------
    candidate : (source, mpp_x_um, mpp_y_um) or None
        None when absent, unit-less, zero, or a placeholder density
        (1 px/unit, 72 or 96 dpi) that says nothing about the specimen.
    """
    if unit_um is None or not x_density or not y_density:
        return None
    if not (math.isfinite(x_density) and math.isfinite(y_density)):
        return None
    if x_density <= 0 or y_density <= 0:
        return None
    if _is_default_density(x_density, unit_um) or _is_default_density(y_density, unit_um):
        return None
    return (source, unit_um / x_density, unit_um / y_density)


def _check_mpp(label: str, value: float, source: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SlideError(f"{label}: pixel size {value!r} from {source} is not a number") from None
    if not math.isfinite(value) or not (MPP_MIN_UM <= value <= MPP_MAX_UM):
        raise SlideError(
            f"{label}: pixel size {value!r} µm/px from {source} is outside "
            f"{MPP_MIN_UM}..{MPP_MAX_UM} µm/px"
        )
    return value


def resolve_mpp(
    label: str, override: float | None, candidates: Iterable[Candidate]
) -> tuple[float, str]:
    """Pick the level-0 pixel size: the override, else the first candidate present.

    Parameters
    ----------
    label : str
        The slide's path (or '<array>') for error messages.
    override : float or None
        The user's ``--mpp``, µm per pixel; wins over any metadata.
    candidates : iterable of (source, mpp_x_um, mpp_y_um) or None
        In priority order; None entries are skipped.

    Returns
    -------
    mpp : float
        µm per pixel, the mean of x and y.
    mpp_source : str
        'flag' for the override, else the candidate's source.

    Raises
    ------
    MissingMppError
        No override and no candidate.
    SlideError
        A value that is not finite or outside 0.05..100 µm/px, or x and y
        differing by more than 2 %.
    """
    if override is not None:
        return _check_mpp(label, override, "the mpp argument"), "flag"
    for cand in candidates:
        if cand is None:
            continue
        source, mpp_x, mpp_y = cand
        mpp_x = _check_mpp(label, mpp_x, source)
        mpp_y = _check_mpp(label, mpp_y, source)
        if abs(mpp_x - mpp_y) > ANISOTROPY_MAX_FRAC * min(mpp_x, mpp_y):
            raise SlideError(
                f"{label}: anisotropic pixels from {source}: x {mpp_x:g} µm/px, "
                f"y {mpp_y:g} µm/px differ by more than {ANISOTROPY_MAX_FRAC:.0%}"
            )
        return (mpp_x + mpp_y) / 2.0, source
    raise MissingMppError(f"{label}: no pixel size in metadata or TIFF tags; pass --mpp")
