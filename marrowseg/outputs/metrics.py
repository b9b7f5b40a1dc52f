"""The ``metrics.json`` document: readouts, areas, counts and full provenance."""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEMA", "READOUT_UNITS", "build_metrics", "stain_mismatch", "dab_run_off_reference", "scan_too_coarse",
           "pixel_size_suspect", "crushed", "CRUSH_FLAG_SHARE", "out_of_focus", "stain_fallbacks", "stain_hue", "OUT_OF_FOCUS_FLAG_FRAC",
           "DAB_RUN_FLAG_SCALE"]

OUT_OF_FOCUS_FLAG_FRAC = 0.1
"""A slide is reported out of focus when at least this share of its judged tissue is."""

SCHEMA = "marrowseg.metrics/1"

#: Units of the stable readout keys (documented in the README).
READOUT_UNITS: dict[str, str] = {
    "cellularity_pct": "% of marrow space (haematopoietic + fat)",
    "bone_area_frac": "fraction of core (bone / (bone + haematopoietic + fat))",
    "marrow_area_mm2": "mm²",
    "adipocyte_count": "count",
    "adipocyte_area_um2_median": "µm²",
    "nucleated_cells": "count",
    "nucleated_cells_per_mm2": "per mm² of haematopoietic tissue",
    "late_erythroid_per_100": "per 100 nucleated cells",
    "megakaryocytes_per_mm2": "per mm² of haematopoietic tissue",
    "cellularity_verdict": "hypocellular | normocellular | hypercellular",
    "ecad_pos_cells": "count",
    "ecad_pos_per_100_nucleated": "per 100 nucleated cells",
    "ecad_pos_per_mm2": "per mm² of haematopoietic tissue",
    "left_shift_ratio": "E-cad+ / (E-cad+ + late erythroid), 0..1",
    "left_shift_ratio_ci95": "95% Wilson interval [low, high]",
    "fibre_length_um_per_1e4um2": "µm of fibre per 10,000 µm² of haematopoietic tissue",
    "intersections_per_mm2": "per mm² of haematopoietic tissue",
    "thick_fibre_frac": "fraction of fibre length",
    "collagen_area_frac": "fraction of haematopoietic area",
    "mf_grade": "WHO/EUMNET MF-0..3",
    "fibrosis_index": "continuous 0..3",
}


def stain_mismatch(metrics: Any) -> dict[str, Any] | None:
    """The stain check of a ``metrics.json`` when its slide's colours confidently name another
    stain than the one analysed (``provenance.tissue.stain_check``, see
    :func:`marrowseg.engine.plan_slide`), else None.

    Returns
    -------
    check : dict or None
        ``looks_like`` (stain key), ``confidence`` (0..1), ``mismatch`` (True).
    """
    check = ((metrics.get("provenance") or {}).get("tissue") or {}).get("stain_check") or {}
    return check if check.get("mismatch") else None


def stain_fallbacks(metrics: Any) -> str:
    """Every reason the slide's per-slide stain step fell back, joined by '; ', else ''.

    The analyzers name each fallback in ``provenance.prepare`` under a key holding
    ``fallback`` (E-cadherin: standard H-DAB vectors, an unscaled counterstain; H&E: a
    haematoxylin beyond the scale limits), at any depth.
    """
    def found(record: Any) -> list[str]:
        if not isinstance(record, Mapping):
            return []
        out = []
        for k, v in record.items():
            if "fallback" in str(k) and v:
                out.append(str(v))
            else:
                out += found(v)
        return out

    return "; ".join(found((metrics.get("provenance") or {}).get("prepare")))


def stain_hue(metrics: Any) -> float | None:
    """How far an H&E slide's stain lies from the development stain, degrees: the larger of its
    haematoxylin and eosin angles (``provenance.prepare.stain_hue_deg``, see
    :meth:`marrowseg.analyzers.he.HEAnalyzer.prepare`), or None where none was estimated."""
    hue = ((metrics.get("provenance") or {}).get("prepare") or {}).get("stain_hue_deg")
    if not isinstance(hue, Mapping) or not hue:
        return None
    return max(float(v) for v in hue.values())


DAB_RUN_FLAG_SCALE = 1.5
"""An E-cadherin run is named pale or heavy when its DAB scale is at least this far from 1 (either way)."""


def dab_run_off_reference(metrics: Any, margin: float = DAB_RUN_FLAG_SCALE) -> float | None:
    """The E-cadherin DAB scale of a ``metrics.json`` when it is ``margin`` or more from 1 either
    way (a run that much paler or heavier than the reference), else None.

    The scale (``provenance.prepare.dab_scale``, :func:`marrowseg.analyzers.ecad.dab_level.dab_scale`)
    makes the counts comparable; a run that far off still deserves a look at its controls.
    """
    ds = ((metrics.get("provenance") or {}).get("prepare") or {}).get("dab_scale")
    if not ds:
        return None
    ds = float(ds)
    return ds if (ds >= margin or ds <= 1.0 / margin) else None


def scan_too_coarse(metrics: Any) -> dict[str, Any] | None:
    """The resolution check of a ``metrics.json`` when its slide was scanned more coarsely than
    the analyzer was validated at (``provenance.tissue.resolution_check``, see
    :func:`marrowseg.engine.plan_slide`), else None.

    Returns
    -------
    check : dict or None
        ``scan_mpp`` and ``max_scan_mpp`` (µm/px), ``too_coarse`` (True).
    """
    check = ((metrics.get("provenance") or {}).get("tissue") or {}).get("resolution_check") or {}
    return check if check.get("too_coarse") else None


def pixel_size_suspect(metrics: Any) -> dict[str, Any] | None:
    """The nuclear-scale check of a ``metrics.json`` when its nuclei measured outside the range
    marrow nuclei read at the right pixel size (``measurements.nuclear_scale``, see
    :func:`marrowseg.analyzers.marrow.nuclear_scale`), else None.

    Returns
    -------
    check : dict or None
        ``geomean_area_um2`` and ``expected_um2`` (µm²), ``cells``, ``outside`` (True).
    """
    check = (metrics.get("measurements") or {}).get("nuclear_scale") or {}
    return check if check.get("outside") else None


CRUSH_FLAG_SHARE = 0.02
"""Crush artefact is named when at least this share of the would-be marrow space was left out as crushed."""


def crushed(metrics: Any, min_share: float = CRUSH_FLAG_SHARE) -> dict[str, Any] | None:
    """The crush measurement of an H&E ``metrics.json`` (``measurements.crush``, see
    :mod:`marrowseg.analyzers.crush`) when at least ``min_share`` of the marrow space and the crushed
    area together was left out as crushed, else None.

    Returns
    -------
    crush : dict or None
        ``area_um2`` and ``share_of_marrow`` (0..1).
    """
    crush = (metrics.get("measurements") or {}).get("crush") or {}
    share = crush.get("share_of_marrow")
    return crush if share is not None and share >= min_share else None


def out_of_focus(metrics: Any, min_frac: float = OUT_OF_FOCUS_FLAG_FRAC) -> dict[str, Any] | None:
    """The focus summary of a ``metrics.json`` (``tiles.out_of_focus_*``, see
    :mod:`marrowseg.focus`) when at least ``min_frac`` of the judged tissue is out of focus,
    else None.

    Returns
    -------
    summary : dict or None
        ``out_of_focus_frac`` (0..1), ``out_of_focus_area_um2``, ``out_of_focus_tiles``,
        ``focus_judged_tiles``, ``focus_min``.
    """
    tiles = metrics.get("tiles") or {}
    frac = tiles.get("out_of_focus_frac")
    return tiles if frac is not None and frac >= min_frac else None


def build_metrics(
    result: Any,
    slide_identity: dict[str, Any],
    *,
    age: float | None = None,
    command: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the metrics document of one analysed slide.

    Parameters
    ----------
    result : SlideResult
        What :func:`marrowseg.engine.run_slide` returned.
    slide_identity : dict
        The reader's ``identity()`` (path, size, checksum, mpp, ...).
    age : float, optional
        Patient age given, years.
    command : list of str, optional
        The command line that produced it.
    extra : dict, optional
        Merged into the top level (e.g. the batch's manifest row).
    """
    report = dict(result.report)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "slide": slide_identity,
        "stain": result.stain,
        "age": age,
        "readouts": report.pop("readouts", {}),
        "areas_um2": report.pop("areas_um2", {}),
        "counts": report.pop("counts", {}),
    }
    doc.update(report)
    doc["units"] = {k: READOUT_UNITS[k] for k in doc["readouts"] if k in READOUT_UNITS}
    prov = dict(result.provenance)
    prov["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    prov["command"] = command if command is not None else list(sys.argv)
    doc["provenance"] = prov
    if extra:
        doc.update(extra)
    return doc
